"""One run, one folder: failed starts write nothing, runs never mix, evaluate-only needs weights."""
import os
import subprocess
import sys

import paddle
import pytest

from passl.io.metrics_log import read_metrics
from test_cli import assert_one_line_error
from toy_training import toy_config, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(HERE, "toy_train_cli.py")


def run(*args):
    proc = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished 2-epoch toy run with evaluation: (config path, output_dir)."""
    tmp = tmp_path_factory.mktemp("old_run")
    cfg = write_config(toy_config(tmp / "out", epochs=2, val=True,
                                  hooks=[{"name": "ToyEngineAccuracy"}]), tmp / "run.yaml")
    code, err = run("-c", cfg)
    assert code == 0, err
    return cfg, str(tmp / "out")


def test_failed_start_leaves_the_folder_as_it_was(old_run):
    cfg, out = old_run
    before = snapshot(out)
    code, err = run("-c", cfg, "--resume", "auto", "-o", "model.hidden=-3")
    assert code != 0
    assert snapshot(out) == before


def test_fresh_start_over_another_run_is_refused(old_run):
    cfg, out = old_run
    before = snapshot(out)
    code, err = run("-c", cfg, "-o", "epochs=1")
    assert_one_line_error(code, err, out, "already holds a run", "--resume auto",
                          "--archive-old-run")
    assert snapshot(out) == before


def test_archive_old_run_moves_it_aside(tmp_path):
    cfg = write_config(toy_config(tmp_path / "out", epochs=2), tmp_path / "run.yaml")
    assert run("-c", cfg)[0] == 0
    old = snapshot(tmp_path / "out")
    code, err = run("-c", cfg, "-o", "epochs=1", "--archive-old-run")
    assert code == 0, err
    archived = os.listdir(tmp_path / "out" / "previous_runs")
    assert len(archived) == 1
    assert snapshot(tmp_path / "out" / "previous_runs" / archived[0]) == old
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["epoch_1.pd", "latest.pd"]
    assert {r["epoch"] for r in read_metrics(str(tmp_path / "out" / "metrics.jsonl"), "train")} == {1}


def test_evaluate_only_needs_weights_or_as_built(old_run):
    cfg, out = old_run
    code, err = run("-c", cfg, "--evaluate-only")
    assert_one_line_error(code, err, "--evaluate-only", "--load", "--as-built")
    code, err = run("-c", cfg, "--evaluate-only", "--resume", "auto")
    assert_one_line_error(code, err, "--evaluate-only", "with --load instead of --resume")


def test_evaluate_only_record_is_marked_with_the_checkpoint_epoch(old_run):
    cfg, out = old_run
    code, err = run("-c", cfg, "--load", os.path.join(out, "checkpoints", "latest.pd"),
                    "--evaluate-only")
    assert code == 0, err
    record = read_metrics(os.path.join(out, "metrics.jsonl"), "eval")[-1]
    assert record["evaluate_only"] is True and record["epoch"] == 2
    code, err = run("-c", cfg, "--evaluate-only", "--as-built")
    assert code == 0, err
    record = read_metrics(os.path.join(out, "metrics.jsonl"), "eval")[-1]
    assert record["evaluate_only"] is True and record["epoch"] is None


def test_load_of_backbone_weights_points_to_pretrained(old_run, tmp_path):
    cfg, out = old_run
    state = paddle.load(os.path.join(out, "checkpoints", "latest.pd"))["model"]
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    path = str(tmp_path / "backbone.pdparams")
    paddle.save(backbone, path)
    code, err = run("-c", cfg, "--load", path, "--evaluate-only")
    assert_one_line_error(code, err, path, "backbone weights", f"--pretrained {path}")


def test_train_log_has_the_loss_lines_even_with_a_progress_bar(tmp_path):
    cfg = toy_config(tmp_path / "out", epochs=1)
    cfg["hooks"] = [{"name": "LoggerHook", "progress_bar": True}]
    code, err = run("-c", write_config(cfg, tmp_path / "run.yaml"))
    assert code == 0, err
    with open(tmp_path / "out" / "train.log") as f:
        log = f.read()
    assert "epoch 1/1 iter 4/4 loss" in log
