"""Opening a weights or checkpoint file runs no code from it (passl.io.paddle_file).

Every entry point refuses a malicious pickle with one error line naming the global it asked
for, before that global is called (no marker file) and before the run writes its outputs;
every file the toolkit writes reads back exactly as ``paddle.load`` returns it.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddle.base.core import GeneratorState

from passl.cli import ArgumentParser, add_trust_file_argument
from passl.config import load_config
from passl.engine.trainer import Trainer
from passl.errors import UserError
from passl.io.checkpoint import KIND, VERSION
from passl.io.paddle_file import load_paddle_file
from passl.io.safe_pickle import UnsafeFileError
from passl.io.weights import extract_weights
from passl.models import MODELS
from test_cli import assert_one_line_error
from test_multiprocess_train import tiny_swav_config
from tiny_image_folder import linear_config, write_config, write_image_folder
from toy_training import toy_config, write_config as write_toy_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(HERE, "toy_train_cli.py")  # tools/train.py with the toy model registered
EXTRACT = os.path.join(ROOT, "tools", "extract_weight.py")
KNN = os.path.join(ROOT, "tools", "knn_eval.py")
REFUSED = f"{open.__module__}.open"  # how pickle names the builtin open (io.open)


class CreatesFile:
    """Unpickling this calls ``open(path, 'w')``: the file appears if the loader runs it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return str(path)


def malicious_weights(path, marker):
    """A weights-file-shaped dict whose last entry runs ``open(marker, 'w')``."""
    return write_pickle({"0.weight": np.ones((8, 16), "float32"), "0.bias": np.zeros(16, "float32"),
                         "payload": CreatesFile(marker)}, path)


def malicious_checkpoint(path, marker):
    """A training-checkpoint-shaped dict with the payload inside its model state."""
    return write_pickle({"kind": KIND, "version": VERSION, "epoch": 1, "iter": 4,
                         "model": {"head.weight": np.ones((16, 4), "float32"),
                                   "payload": CreatesFile(marker)}}, path)


def files_under(directory):
    return {os.path.relpath(os.path.join(d, f), directory)
            for d, _, files in os.walk(directory) for f in files}


def refusal(what, path):
    return (f"error: {what} {path}: refused to load: the file asks for the global {REFUSED}, "
            f"which a weights file does not need (it could run code); if you trust where the "
            f"file comes from, --trust-file loads it with paddle.load, which runs whatever code "
            f"it contains")


def run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_refused(code, stderr, expected_line, marker):
    assert code == 2, stderr
    assert_one_line_error(code, stderr, REFUSED, "--trust-file")
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [expected_line]
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- every entry point refuses

@pytest.mark.parametrize("flag", ["--pretrained", "--load", "--resume", "--resume auto"])
def test_train_refuses_a_malicious_file(tmp_path, flag):
    marker, output_dir = tmp_path / "MARKER", tmp_path / "out"
    cfg = write_toy_config(toy_config(output_dir), tmp_path / "toy.yaml")
    if flag == "--resume auto":
        os.makedirs(output_dir / "checkpoints")
        path = malicious_checkpoint(output_dir / "checkpoints" / "latest.pd", marker)
        args, what = ["--resume", "auto"], "--resume"
    else:
        write = malicious_weights if flag == "--pretrained" else malicious_checkpoint
        path = write(tmp_path / "evil.pd", marker)
        args, what = [flag, path], {"--pretrained": "weights"}.get(flag, flag)
    before = files_under(tmp_path)
    code, _, stderr = run(TRAIN, "-c", cfg, *args)
    expected = refusal(what, path)
    if flag == "--resume auto":  # the one checkpoint there is skipped, and says why
        reason = expected.removeprefix(f"error: --resume {path}: ")
        expected = (f"error: --resume auto: none of the 1 checkpoint(s) in "
                    f"{output_dir / 'checkpoints'} can be resumed (latest.pd ({reason})); start "
                    f"afresh with --archive-old-run (moves them to previous_runs/), or pass "
                    f"--resume PATH")
    assert_refused(code, stderr, expected, marker)
    assert files_under(tmp_path) == before  # nothing written: no config, log or metrics


def test_extract_weight_refuses_a_malicious_checkpoint(tmp_path):
    marker, output = tmp_path / "MARKER", tmp_path / "backbone.pdparams"
    path = malicious_checkpoint(tmp_path / "evil.pd", marker)
    code, _, stderr = run(EXTRACT, path, "--output", str(output), "--remove_prefix")
    assert_refused(code, stderr, refusal("checkpoint", path), marker)
    assert files_under(tmp_path) == {"evil.pd"}


def test_knn_eval_refuses_malicious_weights_and_writes_nothing(tmp_path):
    data = write_image_folder(tmp_path / "data")
    cfg = write_config(tmp_path / "linear.yaml", linear_config(data, tmp_path / "out"))
    marker = tmp_path / "MARKER"
    path = malicious_weights(tmp_path / "evil.pdparams", marker)
    code, _, stderr = run(KNN, "-c", cfg, "--pretrained", path)
    assert_refused(code, stderr, refusal("weights", path), marker)
    assert not os.path.exists(tmp_path / "out")


def test_trust_file_loads_a_legacy_file_loudly(tmp_path):
    """A checkpoint holding a global outside the allow-list (a Path in its config): refused by
    default, extracted with --trust-file after a warning naming the risk."""
    from pathlib import PurePosixPath
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 2))
    path = str(tmp_path / "legacy.pd")
    paddle.save({"model": {"backbone." + k: v for k, v in model.state_dict().items()},
                 "config": {"data": PurePosixPath("/data")}}, path)
    with pytest.raises(UnsafeFileError, match="the global pathlib.PurePosixPath"):
        load_paddle_file(path, "checkpoint")
    output = str(tmp_path / "w.pdparams")
    code, stdout, stderr = run(EXTRACT, path, "--output", output, "--trust-file")
    assert code == 0, stderr
    assert (f"warning: --trust-file: checkpoint {path} is loaded with paddle.load, which runs "
            f"any code the file contains; use it only for files from a source you trust"
            in stderr.splitlines())
    assert sorted(paddle.load(output)) == ["backbone.0.bias", "backbone.0.weight"]


def test_trust_file_has_both_spellings_and_is_off_by_default():
    parser = ArgumentParser()
    add_trust_file_argument(parser)
    assert [parser.parse_args(argv).trust_file
            for argv in ([], ["--trust-file"], ["--trust_file"])] == [False, True, True]


def test_missing_empty_truncated_and_foreign_files_are_one_line(tmp_path):
    paddle.save(paddle.nn.Linear(3, 2).state_dict(), str(tmp_path / "good.pdparams"))
    data = (tmp_path / "good.pdparams").read_bytes()
    (tmp_path / "truncated.pdparams").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.pdparams").write_bytes(b"")
    (tmp_path / "notes.pdparams").write_text("not weights")
    cases = {"absent": "file not found",
             "truncated": "the file ends early (an incomplete copy or download?); copy it again",
             "empty": "the file ends early (an incomplete copy or download?); copy it again",
             "notes": "not a file written by paddle.save (not a pickle: byte 0x6e at offset 0)"}
    for name, message in cases.items():
        path = str(tmp_path / f"{name}.pdparams")
        with pytest.raises(UserError) as error:
            load_paddle_file(path, "--pretrained")
        assert str(error.value) == f"--pretrained {path}: {message}"


# ---------------------------------------------------------------- same results as paddle.load

def assert_same(got, expected, where):
    """Same nested structure, types, key order, and tensors equal bit for bit, in dtype and name.

    Returns the number of tensors and arrays compared."""
    assert type(got) is type(expected), where
    if isinstance(expected, paddle.Tensor):
        assert (got.name, got.dtype, got.shape, str(got.place), got.stop_gradient) == \
            (expected.name, expected.dtype, expected.shape, str(expected.place),
             expected.stop_gradient), where
        assert got.numpy().tobytes() == expected.numpy().tobytes(), where  # bit for bit
        return 1
    if isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        assert got.tobytes() == expected.tobytes() and got.flags.writeable, where
        return 1
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        return sum(assert_same(got[k], v, f"{where}[{k!r}]") for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        return sum(assert_same(g, e, f"{where}[{i}]")
                   for i, (g, e) in enumerate(zip(got, expected)))
    if isinstance(expected, GeneratorState):
        assert got.__getstate__() == expected.__getstate__(), where
        return 0
    assert got == expected, where
    return 0


@pytest.fixture(scope="module")
def written_files(tmp_path_factory):
    """``{label: (path, tensors expected at least)}`` for each kind of file the toolkit writes."""
    base = tmp_path_factory.mktemp("written")
    data = write_image_folder(base / "data")
    swav = tiny_swav_config(data, base / "swav")
    swav["epochs"] = 2  # the queue (from epoch 1) is in the epoch-2 checkpoint
    Trainer(load_config(write_config(base / "swav.yaml", swav))).train()
    swav_checkpoint = str(base / "swav" / "checkpoints" / "latest.pd")
    backbone = str(base / "backbone.pdparams")
    extract_weights(swav_checkpoint, backbone, remove_prefix=True)
    classifier_cfg = load_config(write_config(base / "linear.yaml",
                                              linear_config(data, base / "linear", epochs=1)))
    Trainer(classifier_cfg, pretrained=backbone).train()
    classifier_state = str(base / "classifier.pdparams")
    paddle.save(MODELS.build(classifier_cfg.model).state_dict(), classifier_state)
    paddle.seed(0)
    resnet18 = paddle.vision.models.resnet18().state_dict()
    paddle.save(resnet18, str(base / "resnet18.pdparams"))
    paddle.save(resnet18, str(base / "resnet18_protocol2.pdparams"), protocol=2)
    layer = paddle.nn.Linear(4, 3)
    optimizer = paddle.optimizer.AdamW(parameters=layer.parameters())
    layer(paddle.ones([2, 4])).sum().backward()
    optimizer.step()
    paddle.save(optimizer.state_dict(), str(base / "adamw.pdopt"))
    values = paddle.to_tensor(np.linspace(-3, 3, 24, dtype="float32").reshape(4, 6))
    paddle.save({"half": values.astype("float16"), "bfloat16": values.astype("bfloat16"),
                 "epoch": np.int64(3), "scale": np.float32(0.5)}, str(base / "half.pd"))
    return {"swav checkpoint with queue": (swav_checkpoint, 60),
            "extracted backbone": (backbone, 30),
            "classifier checkpoint": (str(base / "linear" / "checkpoints" / "latest.pd"), 30),
            "classifier state dict": (classifier_state, 30),
            "paddle.vision resnet18": (str(base / "resnet18.pdparams"), 100),
            "resnet18, pickle protocol 2": (str(base / "resnet18_protocol2.pdparams"), 100),
            "AdamW optimizer state": (str(base / "adamw.pdopt"), 4),
            "float16 and bfloat16 tensors": (str(base / "half.pd"), 2)}


@pytest.mark.parametrize("label", ["swav checkpoint with queue", "extracted backbone",
                                   "classifier checkpoint", "classifier state dict",
                                   "paddle.vision resnet18", "resnet18, pickle protocol 2",
                                   "AdamW optimizer state", "float16 and bfloat16 tensors"])
def test_safe_reader_returns_what_paddle_load_returns(written_files, label):
    path, at_least = written_files[label]
    compared = assert_same(load_paddle_file(path, "test"), paddle.load(path), label)
    assert compared >= at_least


def test_checkpoint_content_survives_the_safe_reader(written_files):
    """The parts the resume path relies on are there, with the types paddle.load gives."""
    state = load_paddle_file(written_files["swav checkpoint with queue"][0], "--resume")
    queue = state["per_rank"][0]["hooks"]["SwAVHook"]["queue"]["embeddings"]
    assert isinstance(queue, np.ndarray) and queue.any()
    assert isinstance(state["model"]["backbone.conv1.weight"], paddle.Tensor)
    assert isinstance(state["per_rank"][0]["rng"]["paddle_cpu"][0], GeneratorState)
    assert state["per_rank"][0]["rng"]["numpy"][0] == "MT19937"


def test_object_arrays_are_refused(tmp_path):
    path = str(tmp_path / "objects.pdparams")
    with open(path, "wb") as f:
        pickle.dump({"w": np.array([print, 1], dtype=object)}, f, protocol=4)
    with pytest.raises(UnsafeFileError, match="array of Python objects"):
        load_paddle_file(path, "--pretrained")
