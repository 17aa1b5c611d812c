"""User mistakes on the command line: non-zero exit, one `error:` line naming the mistake."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
DEMO = os.path.join(ROOT, "configs", "swav", "swav_r18_digits.yaml")


def run_train(*args, env=None):
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr


def assert_one_line_error(code, stderr, *fragments):
    assert code != 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def tiny_cfg(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"_base_: {DEMO}\noutput_dir: {tmp_path / 'out'}\n")
    return str(path)


def test_override_typo(tiny_cfg):
    code, err = run_train("-c", tiny_cfg, "-o", "epoch=3")
    assert_one_line_error(code, err, "epoch", "did you mean: epochs")


def test_nested_override_typo(tiny_cfg):
    code, err = run_train("-c", tiny_cfg, "-o", "dataloader.train.sampler.batchsize=8")
    assert_one_line_error(code, err, "dataloader.train.sampler.batchsize",
                          "did you mean: batch_size")


def test_unknown_registered_name(tiny_cfg):
    code, err = run_train("-c", tiny_cfg, "-o", "model.backbone.name=ResNett")
    assert_one_line_error(code, err, "model.backbone.name", "'ResNett'", "did you mean: ResNet")


def test_unknown_component_key(tiny_cfg):
    code, err = run_train("-c", tiny_cfg, "-o", "+model.backbone.dept=18")
    assert_one_line_error(code, err, "model.backbone.dept", "ResNet", "did you mean: depth")


def test_missing_config_and_missing_weights(tmp_path, tiny_cfg):
    code, err = run_train("-c", str(tmp_path / "nope.yaml"))
    assert_one_line_error(code, err, "nope.yaml", "not found")
    code, err = run_train("-c", tiny_cfg, "--pretrained", str(tmp_path / "w.pdparams"))
    assert_one_line_error(code, err, "--pretrained", "w.pdparams", "not found")


def test_bad_flag():
    code, err = run_train("--confg", "x.yaml")
    assert_one_line_error(code, err, "--confg")


def test_debug_shows_traceback(tiny_cfg):
    code, err = run_train("-c", tiny_cfg, "-o", "epoch=3", env={"PASSL_DEBUG": "1"})
    assert code != 0 and "Traceback" in err and "ConfigError" in err


def test_pretrained_mismatch_is_an_error_unless_nonstrict(tmp_path):
    import paddle

    from passl.config import load_config
    from passl.models import BACKBONES

    clas = os.path.join(ROOT, "configs", "swav", "swav_clas_r18_digits.yaml")
    weights = BACKBONES.build(load_config(clas).model.backbone).state_dict()
    weights.pop("conv1.weight")
    path = str(tmp_path / "partial.pdparams")
    paddle.save(weights, path)
    run = ("-c", clas, "--pretrained", path, "-o", f"output_dir={tmp_path / 'out'}", "-o", "epochs=1")
    code, err = run_train(*run)
    assert_one_line_error(code, err, "missing", "conv1.weight", "--pretrained-nonstrict")
    code, err = run_train(*run, "--pretrained-nonstrict")
    assert code == 0, err
    assert os.path.exists(tmp_path / "out" / "checkpoints" / "latest.pd")
