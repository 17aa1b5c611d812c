"""The demo: progress notes, a second run (reuse, resume, refuse), and end to end on the
built-in Digits with tiny budgets."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import paddle
import pytest

from passl.config import load_config
from passl.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", os.path.join(ROOT, "tools",
                                                                           "run_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


def fake_pretraining(run_dir, config_path, overrides, epochs_done):
    """A run folder as tools/train.py leaves it: resolved config.yaml and epoch checkpoints."""
    from passl.config import load_config, save_config
    save_config(load_config(config_path, overrides), os.path.join(run_dir, "config.yaml"))
    for epoch in epochs_done:
        path = os.path.join(run_dir, "checkpoints", f"epoch_{epoch}.pd")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    latest = os.path.join(run_dir, "checkpoints", "latest.pd")
    if os.path.lexists(latest):
        os.remove(latest)
    os.symlink(f"epoch_{epochs_done[-1]}.pd", latest)


def test_second_run_reuses_resumes_or_refuses_with_the_way_out(tmp_path):
    demo = load_run_demo()
    config = demo.METHODS["swav"]
    run_dir = str(tmp_path / "pretrain_swav")
    overrides = [f"output_dir={run_dir}", "epochs=4"]
    assert demo.pretraining_plan(config, overrides, run_dir, fresh=False) == ("start", [])
    fake_pretraining(run_dir, config, overrides, [2])
    assert demo.pretraining_plan(config, overrides, run_dir, False) == \
        ("resume", ["--resume", "auto"])
    fake_pretraining(run_dir, config, overrides, [2, 4])
    assert demo.pretraining_plan(config, overrides, run_dir, False) == ("reuse", [])
    assert demo.pretraining_plan(config, overrides, run_dir, True) == \
        ("start", ["--archive-old-run"])
    other = [f"output_dir={run_dir}", "epochs=6"]
    with pytest.raises(UserError) as error:
        demo.pretraining_plan(config, other, run_dir, False)
    assert str(error.value) == (f"{run_dir} holds a pretraining with another config (differs "
                                f"in: epochs); pass --fresh to move it aside and pretrain "
                                f"again, or --output-dir NEW_DIR")


def test_methods_are_a_table_of_pretraining_configs_of_the_evaluated_backbone():
    demo = load_run_demo()
    assert set(demo.METHODS) == {"swav", "deepclusterv2"}
    evaluated = load_config(demo.CLAS_CFG).model.backbone.to_dict()
    for method, config in demo.METHODS.items():
        assert load_config(config).model.backbone.to_dict() == evaluated, method
    assert demo.parse_args([]).methods == ["swav", "deepclusterv2"]
    assert demo.parse_args(["--methods", "swav"]).methods == ["swav"]
    assert demo.parse_args(["--archive-old-run"]).fresh  # train.py's word for it works too
    assert demo.PICTURED in demo.METHODS


@pytest.mark.slow
def test_demo_pipeline_runs_twice_and_reports_its_metrics(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, os.path.join(ROOT, "tools", "run_demo.py"), "--epochs", "2",
               "--finetune-epochs", "1", "--draws", "2", "--output-dir", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # progress streamed while pretraining ran: a note per epoch (10 at most)
    assert re.search(r"^    epoch 1/2  loss [\d.]+  about \S+ left$", proc.stdout, re.M)
    assert re.search(r"^    epoch 2/2  loss [\d.]+  about \S+ left$", proc.stdout, re.M)

    train = [r for r in read_records(out / "pretrain_swav" / "metrics.jsonl")
             if r["type"] == "train"]
    assert train and {"epoch", "iter", "loss", "lr", "ips"} <= set(train[-1])
    assert train[-1]["epoch"] == 2 and train[-1]["iter"] == 2 * 22  # 1,442 images / 64
    weights = paddle.load(str(out / "swav_backbone.pdparams"))
    assert "conv1.weight" in weights and not any(k.startswith("backbone.") for k in weights)

    with open(out / "evaluate" / "results.json") as f:
        records = json.load(f)
    cells = {(r["features"], r["protocol"], r["labels_per_class"]): r for r in records}
    for name in ("swav", "random"):
        for protocol in ("knn", "linear", "finetune"):
            assert cells[(name, protocol, None)]["draws"] == 1
            assert cells[(name, protocol, 5)]["draws"] == 2
    assert ("pixels", "finetune", None) not in cells and ("pixels", "linear", 5) in cells
    # the table on the terminal is results.json's
    row = re.search(r"^swav\s.*$", proc.stdout, re.M).group(0).split()
    assert row[1] == f"{cells[('swav', 'knn', None)]['top1']:.2f}"
    # the low-shot fine-tuning saw 5 images per class: one epoch of batch 10 is 5 steps
    few = [r for r in read_records(out / "evaluate" / "finetune" / "swav" /
                                   "5_per_class_draw1" / "metrics.jsonl") if r["type"] == "train"]
    assert few[-1]["iter"] == 5
    # 10 classes: even a random backbone's kNN with all labels is far above chance
    assert cells[("random", "knn", None)]["top1"] > 50
    assert cells[("pixels", "knn", None)]["top1"] > 90
    for verb in ("prototypes", "usage", "features"):
        with open(out / "pictures" / f"demo_{verb}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "swav pretraining: reusing the finished run in" in again.stdout
    with open(out / "evaluate" / "results.json") as f:
        assert json.load(f) == records  # the same weights and draws: the same table
