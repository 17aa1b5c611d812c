"""``tools/benchmark.py train``: the JSON contract on CI-sized shapes, and the FLOP counter."""
import json
import os
import subprocess
import sys

import paddle
import paddle.nn as nn
import pytest

from benchmarks.train_step import count_macs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "18", "--layers", "1", "1", "1", "1", "--base-width", "8", "--stem", "small",
        "--hidden-dim", "32", "--num-prototypes", "16", "--nmb-crops", "2", "2",
        "--size-crops", "32", "16", "--batch-size", "4", "--steps", "2", "--warmup", "1"]


def run_benchmark(*extra):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "train",
                             *TINY, *extra, "--json"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("SwAV training step, 2x32+2x16 crops, batch 4 per process")
    return json.loads(lines[-1])


def check_record(record, nproc, threads):
    for key in ("images_per_s", "gflops_per_s", "peak_rss_mb", "step_s"):
        assert isinstance(record[key], float) and record[key] > 0, key
    assert record["nproc"] == nproc and record["threads"] == threads
    assert len(record["peak_rss_mb_per_process"]) == nproc
    assert len(record["step_times_s"]) == 2 and record["losses_finite"]
    # images/s and GFLOP/s come from the same step time and the FLOP count
    gflops = record["images_per_s"] * record["train_gflop_per_image"]
    assert abs(record["gflops_per_s"] - gflops) <= 0.02 * gflops + 0.01


@pytest.mark.parametrize("extra, nproc, threads", [
    (("--threads", "1", "--with-data"), 1, 1),
    (("--nproc", "2"), 2, 1),
], ids=["one-process-real-data", "two-processes"])
def test_train_benchmark_ends_with_the_json_contract(extra, nproc, threads):
    record = run_benchmark(*extra)
    check_record(record, nproc, threads)
    assert record["with_data"] == ("--with-data" in extra)
    assert record["crops"] == "2x32+2x16" and record["num_prototypes"] == 16


def test_flop_counter_matches_a_hand_count():
    net = nn.Sequential(
        nn.Conv2D(3, 4, 3, padding=1),                       # [2, 4, 8, 8], 3*3*3 MACs each
        nn.Conv2D(4, 4, 3, stride=2, padding=1, groups=2),   # [2, 4, 4, 4], 2*3*3 MACs each
        nn.Flatten(),
        nn.Linear(64, 5),                                    # [2, 5], 64 MACs each
    )
    images = paddle.randn([2, 3, 8, 8])  # stop_gradient: the first conv has no input gradient
    forward, backward = count_macs(net, lambda: net(images))
    conv1, conv2, linear = 2 * 4 * 8 * 8 * 27, 2 * 4 * 4 * 4 * 18, 2 * 5 * 64
    assert forward == conv1 + conv2 + linear
    assert backward == conv1 + 2 * conv2 + 2 * linear
    assert not net[0]._forward_post_hooks  # the counter removed its hooks
