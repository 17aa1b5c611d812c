"""tools/evaluate.py and passl.evaluation.suite on a folder the tests build: the records, the
kNN that equals tools/knn_eval.py, disjoint draws, fine-tuning on a draw, one-line errors."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml

from passl.config import config_from_dict, load_config
from passl.data.registry import DATASETS
from passl.data.subsets import per_class_draw
from passl.errors import UserError
from passl.evaluation import suite
from passl.models import BACKBONES
from tiny_image_folder import (NORMALIZE, TINY_RESNET, linear_config, write_config,
                               write_image_folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "evaluate.py")
RECORD_KEYS = {"features", "protocol", "labels_per_class", "top1", "top1_std", "draws"}


def load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 12 train / 4 val noisy colour images, a config over them, and weights."""
    base = tmp_path_factory.mktemp("suite")
    data = write_image_folder(base / "data", per_class=(12, 4), noise=150)
    config = write_config(base / "linear.yaml", linear_config(data, base / "knn_out"))
    paddle.seed(5)
    weights = str(base / "backbone.pdparams")
    paddle.save(BACKBONES.build(dict(TINY_RESNET)).state_dict(), weights)
    return {"data": str(data), "config": config, "weights": weights, "base": base}


def test_tool_records_table_and_knn_equal_to_knn_eval(folder, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, TOOL, "--data", folder["data"], "-c", folder["config"],
                           "--pretrained", f"mine={folder['weights']}", "--shots", "1", "3",
                           "--draws", "3", "--knn-k", "5", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out / "results.json") as f:
        records = json.load(f)
    assert {r["features"] for r in records} == {"mine", "random", "pixels"}
    for record in records:
        assert RECORD_KEYS <= set(record), record
        assert record["protocol"] in ("knn", "linear")
        values = record["top1_per_draw"]
        assert record["draws"] == len(values) == (1 if record["labels_per_class"] is None else 3)
        assert record["top1"] == pytest.approx(np.mean(values))
        assert record["top1_std"] == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0)
    assert sorted({r["labels_per_class"] or 0 for r in records}) == [0, 1, 3]
    # every record is a cell of the printed table
    for record in records:
        row = re.search(rf"^{record['features']}\s.*$", proc.stdout, re.M).group(0)
        assert suite.format_cell(record) in row.split()
    assert re.search(r"^mine beats random beyond the draws' spread in \d of 6 columns",
                     proc.stdout, re.M)
    with open(out / "results.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    knn = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "knn_eval.py"),
                          "-c", folder["config"], "--pretrained", folder["weights"], "--k", "5"],
                         capture_output=True, text=True, timeout=300)
    assert knn.returncode == 0, knn.stderr
    single = float(re.search(r"kNN top-1 ([\d.]+)", knn.stdout).group(1))
    suite_knn = next(r for r in records if r["features"] == "mine" and r["protocol"] == "knn"
                     and r["labels_per_class"] is None)
    assert suite_knn["top1"] == pytest.approx(single, abs=0.01)


def test_draws_are_disjoint_and_protocols_match_an_independent_vote(folder):
    split = suite.locate_data(folder["data"])
    columns, notes = suite.label_columns(split.train_labels, split.classes, [2, 5], draws=3)
    assert notes == ["note: 5 labels per class: 2 disjoint draw(s) fit, not 3 (class '0' has "
                     "12 train images)"]
    assert [(n, len(d)) for n, d in columns] == [(None, 1), (2, 3), (5, 2)]
    for per_class, draws in columns[1:]:
        seen = set()
        for index in draws:
            assert not seen & set(index)
            seen |= set(index)
            assert np.bincount(split.train_labels[index]).tolist() == [per_class] * 3
    # pixel features: kNN of each draw equals a vote computed here with NumPy
    cfg = load_config(folder["config"])
    features = suite.pixel_features(suite.eval_loader_blocks(cfg, split))
    records = suite.frozen_protocols("pixels", features, split, columns, 5, 0.07)
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in features]
    knn = next(r for r in records if r["protocol"] == "knn" and r["labels_per_class"] == 2)
    for index, value in zip(columns[1][1], knn["top1_per_draw"]):
        similarity = unit[1] @ unit[0][index].T
        votes = np.zeros((len(unit[1]), 3))
        for query, row in enumerate(similarity):
            for neighbour in np.argsort(-row)[:5]:
                votes[query, split.train_labels[index][neighbour]] += np.exp(row[neighbour] / 0.07)
        assert value == pytest.approx((votes.argmax(1) == split.val_labels).mean() * 100)


def test_val_fraction_writes_a_stratified_split(folder, tmp_path):
    train_only = tmp_path / "data"
    train_only.mkdir()
    os.symlink(os.path.join(folder["data"], "train"), train_only / "train")
    split = suite.locate_data(str(train_only), val_fraction=0.25, output_dir=str(tmp_path / "o"))
    assert np.bincount(split.val_labels).tolist() == [3, 3, 3]
    assert np.bincount(split.train_labels).tolist() == [9, 9, 9]
    lists = [open(tmp_path / "o" / "split" / f"{s}.txt").read().split("\n") for s in
             ("train", "val")]
    assert not set(filter(None, lists[0])) & set(filter(None, lists[1]))
    assert split.train["name"] == "ImageList" and split.classes == ["0", "1", "2"]


def test_list_files_are_read_like_folders(folder, tmp_path):
    os.symlink(folder["data"], tmp_path / "images")
    by_folder = suite.locate_data(folder["data"])
    for split, labels in (("train", by_folder.train_labels), ("val", by_folder.val_labels)):
        paths = DATASETS.build(getattr(by_folder, split)).relative_paths()
        (tmp_path / f"{split}.txt").write_text("".join(
            f"images/{split}/{path} {label}\n" for path, label in zip(paths, labels)))
    by_list = suite.locate_data(str(tmp_path))
    assert by_list.train == {"name": "ImageList", "root": str(tmp_path),
                             "list_file": str(tmp_path / "train.txt")}
    assert by_list.classes == ["0", "1", "2"]
    assert np.array_equal(by_list.train_labels, by_folder.train_labels)
    assert np.array_equal(by_list.val_labels, by_folder.val_labels)


def make_folder(root, train, val):
    """root/train/CLASS and root/val/CLASS with the given image counts per class."""
    for split, counts in (("train", train), ("val", val)):
        for name, count in counts.items():
            os.makedirs(root / split / name)
            for i in range(count):
                (root / split / name / f"{i}.png").write_bytes(b"")
    return str(root)


@pytest.mark.parametrize("make, flags, message", [
    (lambda r: make_folder(r, {"a": 2, "b": 2}, {}), [],
     "--data {d}: no val split (val/ or val.txt); add DIR/val/CLASS/*, or pass --val-fraction "
     "0.2 to hold out 20% of every train class as val"),
    (lambda r: make_folder(r, {"a": 2, "b": 2, "c": 2}, {"a": 1}), [],
     "--data {d}: class(es) missing from val: b, c (2 of 3); add val images of every class "
     "(DIR/val/CLASS/*), or remove those classes from train"),
    (lambda r: make_folder(r, {"a": 4, "b": 2}, {"a": 1, "b": 1}), ["--shots", "1", "3"],
     "--shots 3: class 'b' has only 2 train image(s), fewer than 3; drop or lower that --shots "
     "value"),
    (lambda r: make_folder(r, {"a": 2}, {"a": 1}), ["--val-fraction", "0.5"],
     "--val-fraction: {d} has a val split already; drop --val-fraction to use it"),
    (lambda r: (r.mkdir(), str(r))[1], [], "--data {d}: no train/ folder or train.txt; expected "
     "DIR/train/CLASS/* and DIR/val/CLASS/* (or list files DIR/train.txt and DIR/val.txt)"),
])
def test_folder_problems_are_one_line(tmp_path, capsys, make, flags, message):
    data = make(tmp_path / "data")
    with pytest.raises(SystemExit) as stop:
        load_tool().run_cli(load_tool().main, ["--data", data, "--output", str(tmp_path / "o"),
                                               "--baselines", "pixels", *flags])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(d=data)}\n"


def test_weights_that_do_not_fit_stop_before_any_work(folder, tmp_path, capsys):
    wide = str(tmp_path / "wide.pdparams")
    paddle.save(BACKBONES.build({**TINY_RESNET, "base_width": 16}).state_dict(), wide)
    tool = load_tool()
    with pytest.raises(SystemExit) as stop:
        tool.run_cli(tool.main, ["--data", folder["data"], "-c", folder["config"],
                                 "--pretrained", folder["weights"], wide,
                                 "--output", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert re.fullmatch(rf"error: weights {wide} do not fit ResNet: \d+ mismatched .*\n",
                        capsys.readouterr().err)
    assert not (tmp_path / "o" / "results.json").exists()


def test_row_names(folder):
    tool = load_tool()
    rows = tool.parse_rows([folder["weights"], f"b={folder['weights']}"], ["pixels"])
    assert [(r.name, r.weights, r.pixels) for r in rows] == [
        ("backbone", folder["weights"], False), ("b", folder["weights"], False),
        ("pixels", None, True)]
    for specs, message in (([folder["weights"]] * 2, "a second row named 'backbone'"),
                           ([f"random={folder['weights']}"], "'random' names a baseline row"),
                           (["nope.pdparams"], "file not found: nope.pdparams")):
        with pytest.raises(UserError, match=message):
            tool.parse_rows(specs, ["random"])


def test_comparison_needs_the_spreads_apart():
    def record(name, top1, std, per_class=5):
        return {"features": name, "protocol": "knn", "labels_per_class": per_class,
                "top1": top1, "top1_std": std, "draws": 1 if per_class is None else 5}
    records = [record("w", 90, 2), record("random", 80, 3), record("pixels", 87, 2),
               record("w", 99, 0, None), record("pixels", 98, 0, None)]
    lines = suite.comparison_lines(records)
    assert "w beats random beyond the draws' spread in 1 of 1 columns: kNN 5/class" in lines
    # 90 - 2 = 88 does not clear 87 + 2 = 89; with all labels 99 > 98
    assert "w beats pixels beyond the draws' spread in 1 of 2 columns: kNN all" in lines
    table = suite.format_table(records).splitlines()
    assert table[2].split() == ["w", "99.00", "90.00±2.00"]
    assert table[3].split() == ["random", "-", "80.00±3.00"]


def test_finetune_trains_on_exactly_the_draw(folder, tmp_path):
    from passl.engine.finetune import finetune_config, finetune_top1
    from passl.io.metrics_log import read_metrics

    split = suite.locate_data(folder["data"])
    cfg = load_config(folder["config"])
    val_block = suite.eval_loader_blocks(cfg, split)[1]["dataset"]
    recipe_data = linear_config(folder["base"] / "data", tmp_path / "unused", epochs=2)
    recipe_data["dataloader"]["train"]["sampler"]["batch_size"] = 32  # more than 6 images
    recipe = config_from_dict(recipe_data, "recipe.yaml")
    job = suite.FinetuneJob(name="mine", weights=folder["weights"], per_class=2, draw=1, seed=0,
                            model={**cfg.model, "num_classes": 3}, train=split.train,
                            val=val_block, images=6, output_dir=str(tmp_path / "ft"))
    run_cfg = finetune_config(recipe, job)
    assert run_cfg.model.freeze_backbone is False
    assert run_cfg.dataloader.train.sampler.batch_size == 6
    drawn = DATASETS.build(run_cfg.dataloader.train.dataset).relative_paths()
    all_paths = DATASETS.build(split.train).relative_paths()
    assert drawn == [all_paths[i] for i in per_class_draw(split.train_labels, 2, 1)]
    assert run_cfg.dataloader.val.dataset.transforms == [NORMALIZE]

    top1 = finetune_top1(recipe, job)
    evaluations = read_metrics(str(tmp_path / "ft" / "metrics.jsonl"), "eval")
    assert top1 == evaluations[-1]["top1"] and evaluations[-1]["epoch"] == 2
    trained = read_metrics(str(tmp_path / "ft" / "metrics.jsonl"), "train")
    assert trained[-1]["iter"] == 2  # one batch of the 6 drawn images per epoch
    with open(tmp_path / "ft" / "config.yaml") as f:
        assert yaml.safe_load(f)["dataloader"]["train"]["dataset"]["subset"] == \
            {"per_class": 2, "seed": 0, "draw": 1}
