"""End to end on the built-in Digits data: pretrain -> extract -> kNN and linear, tiny budgets."""
import json
import os
import re
import subprocess
import sys

import paddle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_demo_pipeline_runs_and_reports_its_metrics(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_demo.py"),
                           "--epochs", "2", "--linear-epochs", "1", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    train = [r for r in read_records(out / "pretrain" / "metrics.jsonl") if r["type"] == "train"]
    assert train and {"epoch", "iter", "loss", "lr", "ips"} <= set(train[-1])
    assert train[-1]["epoch"] == 2 and train[-1]["iter"] == 2 * 22  # 1,442 images / 64, dropped last
    assert all(r["loss"] > 0 for r in train)

    weights = paddle.load(str(out / "backbone.pdparams"))
    assert weights and all(not k.startswith("backbone.") for k in weights)
    assert "conv1.weight" in weights

    printed = {}
    for init in ("random init", "SwAV"):
        row = re.search(rf"^{init}\s+([\d.]+)\s+([\d.]+)$", proc.stdout, re.M)
        assert row, proc.stdout
        printed[init] = tuple(float(x) for x in row.groups())
    for tag, init in (("random", "random init"), ("swav", "SwAV")):
        knn = read_records(out / f"knn_{tag}" / "metrics.jsonl")[-1]["knn_top1"]
        linear = [r for r in read_records(out / f"linear_{tag}" / "metrics.jsonl") if "top1" in r]
        assert printed[init] == (round(knn, 2), round(linear[-1]["top1"], 2))
        assert 0 <= knn <= 100 and 0 <= linear[-1]["top1"] <= 100
    # 10 classes: even one epoch of either backbone is far above chance in kNN
    assert printed["random init"][0] > 50 and printed["SwAV"][0] > 50
    assert re.search(r"bar kNN: .* (met|MISSED)", proc.stdout)
    # the pictures of tools/visualize.py (their content is tested in test_visualize.py)
    for verb in ("prototypes", "usage", "features"):
        with open(out / "pictures" / f"demo_{verb}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
