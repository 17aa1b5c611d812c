"""The demo: its table and progress notes, and end to end on the built-in Digits with tiny budgets."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("SwAV", "random init", "raw pixels")


def load_run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", os.path.join(ROOT, "tools",
                                                                           "run_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table_rows(stdout, names=ROWS):
    """{row name: [6 cells]} from the printed table ('-' stays a string)."""
    rows = {}
    for name in names:
        match = re.search(rf"^{name}((?:\s+(?:[\d.]+|-)){{6}})$", stdout, re.M)
        assert match, stdout
        rows[name] = [cell if cell == "-" else float(cell) for cell in match.group(1).split()]
    return rows


def test_progress_notes_come_from_epoch_ends_and_evaluations():
    demo = load_run_demo()
    end = ("[2026-12-01 15:21:51] INFO epoch 4/20 iter 22/22 loss 2.1457 lr 0.09066 "
           "images/s 72.1 eta 0:12:43 prototypes_used 0.7667 queue_in_use 1")
    assert demo.progress_of(end) == "epoch 4/20  loss 2.146  about 0:12:43 left"
    assert demo.progress_of(end.replace("iter 22/22", "iter 10/22")) is None
    assert demo.progress_of(end.replace("epoch 4/20", "epoch 3/20")) is None  # every 2nd of 20
    assert demo.progress_of(end.replace("epoch 4/20", "epoch 7/7")).startswith("epoch 7/7 ")
    assert demo.progress_of("[t] INFO evaluation after epoch 10: top1 70.42, top5 96.62") == \
        "after epoch 10: top1 70.42, top5 96.62"
    assert demo.progress_of("[t] INFO checkpoint saved: x.pd") is None


def test_table_has_every_protocol_for_every_label_column():
    demo = load_run_demo()
    scores = {(column, protocol): 10.0 * i + j for i, (column, _) in enumerate(demo.LABELS)
              for j, protocol in enumerate(demo.PROTOCOLS)}
    table = demo.format_table([("SwAV", scores), ("raw pixels", {("all labels", "kNN"): 97.5})])
    rows = table_rows(table, names=("SwAV", "raw pixels"))
    assert rows == {"SwAV": [0.0, 1.0, 2.0, 10.0, 11.0, 12.0],
                    "raw pixels": [97.5, "-", "-", "-", "-", "-"]}
    assert "all labels" in table.splitlines()[0] and "5 per class" in table.splitlines()[0]


@pytest.mark.slow
def test_demo_pipeline_runs_and_reports_its_metrics(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_demo.py"),
                           "--epochs", "2", "--linear-epochs", "1", "--finetune-epochs", "1",
                           "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # progress streamed while pretraining ran: a note per epoch (10 at most)
    assert re.search(r"^    epoch 1/2  loss [\d.]+  about \S+ left$", proc.stdout, re.M)
    assert re.search(r"^    epoch 2/2  loss [\d.]+  about \S+ left$", proc.stdout, re.M)

    train = [r for r in read_records(out / "pretrain" / "metrics.jsonl") if r["type"] == "train"]
    assert train and {"epoch", "iter", "loss", "lr", "ips"} <= set(train[-1])
    assert train[-1]["epoch"] == 2 and train[-1]["iter"] == 2 * 22  # 1,442 images / 64, dropped last
    assert all(r["loss"] > 0 for r in train)

    weights = paddle.load(str(out / "backbone.pdparams"))
    assert weights and all(not k.startswith("backbone.") for k in weights)
    assert "conv1.weight" in weights

    rows = table_rows(proc.stdout)
    for tag, init in (("random", "random init"), ("swav", "SwAV")):
        expected = []
        for slug in ("all", "5shot"):
            expected.append(read_records(out / f"kNN_{tag}_{slug}" / "metrics.jsonl")[-1]["knn_top1"])
            for protocol in ("linear", "finetune"):
                records = read_records(out / f"{protocol}_{tag}_{slug}" / "metrics.jsonl")
                expected.append([r for r in records if "top1" in r][-1]["top1"])
        assert rows[init] == [round(value, 2) for value in expected]
    # the low-shot runs really saw 5 images per class: one epoch of batch 10 is 5 steps
    few = [r for r in read_records(out / "finetune_swav_5shot" / "metrics.jsonl")
           if r["type"] == "train"]
    assert few[-1]["iter"] == 5
    assert rows["raw pixels"][2] == "-" and rows["raw pixels"][5] == "-"
    # 10 classes: even a random backbone's kNN with all labels is far above chance
    assert rows["random init"][0] > 50 and rows["SwAV"][0] > 50 and rows["raw pixels"][0] > 90
    assert " met" not in proc.stdout and "bar " not in proc.stdout
    # the pictures of tools/visualize.py (their content is tested in test_visualize.py)
    for verb in ("prototypes", "usage", "features"):
        with open(out / "pictures" / f"demo_{verb}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
