"""tools/extract_weight.py: checkpoint -> backbone weights -> load_pretrained, and its errors."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.io.checkpoint import KIND, VERSION, save_checkpoint
from passl.io.weights import load_pretrained
from passl.models import BACKBONES, MODELS
from test_cli import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "extract_weight.py")
TINY_RESNET = {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 8,
               "stem": "small"}
TINY_SWAV = {"name": "SwAV", "backbone": TINY_RESNET,
             "neck": {"name": "SwAVNeck", "in_dim": 64, "hidden_dim": 32, "out_dim": 16},
             "head": {"name": "SwAVPrototypes", "in_dim": 16, "num_prototypes": 10},
             "loss": {"name": "SwAVLoss", "nmb_crops": [2], "crops_for_assign": [0, 1]}}


def run_tool(*args):
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A SwAV training checkpoint in the engine's format, with its latest.pd link."""
    paddle.seed(3)
    model = MODELS.build(TINY_SWAV)
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    save_checkpoint({"kind": KIND, "version": VERSION, "epoch": 1, "iter": 5,
                     "model": model.state_dict()}, str(directory))
    return model, directory


def test_round_trip_through_latest_link(pretrained, tmp_path):
    model, directory = pretrained
    output = str(tmp_path / "out" / "backbone.pdparams")
    code, stdout, stderr = run_tool(str(directory / "latest.pd"), "--output", output,
                                    "--remove_prefix")
    assert code == 0, stderr
    expected = model.backbone.state_dict()
    values = sum(int(np.prod(t.shape)) for t in expected.values())
    assert f"wrote {len(expected)} tensors ({values:,} values)" in stdout

    paddle.seed(4)
    fresh = BACKBONES.build(dict(TINY_RESNET))
    report = load_pretrained(fresh, output)  # strict: raises on any missing/unexpected name
    assert report["missing"] == [] and len(report["loaded"]) == len(expected)
    for name, tensor in fresh.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), expected[name].numpy())


def test_prefix_kept_without_remove_prefix(pretrained, tmp_path):
    model, directory = pretrained
    output = str(tmp_path / "neck.pdparams")
    code, _, stderr = run_tool(str(directory / "epoch_1.pd"), "--output", output, "--prefix", "neck")
    assert code == 0, stderr
    assert sorted(paddle.load(output)) == sorted("neck." + k for k in model.neck.state_dict())


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["absent.pd", "file not found"]),
    ("not_checkpoint", ["notes.pd", "not a file written by paddle.save"]),
    ("weights_file", ["weights.pdparams", "not a training checkpoint"]),
    ("prefix", ["'encoder.*'", "prefixes present: backbone, head, neck"]),
    ("extension", ["--output", "w.pth", ".pdparams"]),
])
def test_errors_are_one_line(pretrained, tmp_path, case, fragments):
    checkpoint = str(pretrained[1] / "epoch_1.pd")
    output, extra = str(tmp_path / "w.pdparams"), []
    if case == "missing":
        checkpoint = str(tmp_path / "absent.pd")
    elif case == "not_checkpoint":
        checkpoint = str(tmp_path / "notes.pd")
        with open(checkpoint, "w") as f:
            f.write("not a checkpoint")
    elif case == "weights_file":
        checkpoint = str(tmp_path / "weights.pdparams")
        paddle.save(pretrained[0].backbone.state_dict(), checkpoint)
    elif case == "prefix":
        extra = ["--prefix", "encoder"]
    elif case == "extension":
        output = str(tmp_path / "w.pth")
    code, _, stderr = run_tool(checkpoint, "--output", output, *extra)
    assert code == 2
    assert_one_line_error(code, stderr, *fragments)
    assert not os.path.exists(output)
