"""PASSL v1 files as they are: extract_weight, --pretrained, --load and convert_weights.

The fixtures are made here by PASSL v1's own layers and writers re-expressed in Paddle
(tests/passl_v1_reference.py): a SwAV pretraining checkpoint and a linear-evaluation
checkpoint as v1's CheckpointHook pickles them, a weights file as v1's extract_weight.py
writes it, and a SwAV state dict saved with paddle.save. Every tensor is random, so a tensor
loaded into the wrong place changes the compared outputs.
"""
import contextlib
import importlib.util
import io
import logging
import os

import numpy as np
import paddle
import pytest
import yaml

import passl_v1_reference as v1
from passl.cli import run_cli
from passl.config import load_config
from passl.errors import UserError
from passl.io.checkpoint import load_model_weights
from passl.io.paddle_file import load_paddle_file
from passl.io.weights import load_pretrained
from passl.models import BACKBONES, MODELS
from passl.models.passl_v1 import model_state, recognise
from passl.utils.logger import get_logger
from test_cli import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH, CHANNELS, HIDDEN, EMBEDDING, PROTOTYPES, CLASSES = 18, 8, 32, 16, 10, 7
TRUNK = {"channels": CHANNELS, "blocks": 1}  # v1's ResNet-18 narrowed and one block per stage
RESNET = {"name": "ResNet", "depth": DEPTH, "base_width": CHANNELS, "layers": [1, 1, 1, 1]}
SWAV = {"name": "SwAV", "backbone": RESNET,
        "neck": {"name": "SwAVNeck", "in_dim": CHANNELS * 8, "hidden_dim": HIDDEN,
                 "out_dim": EMBEDDING},
        "head": {"name": "SwAVPrototypes", "in_dim": EMBEDDING, "num_prototypes": PROTOTYPES},
        "loss": {"name": "SwAVLoss", "nmb_crops": [2], "crops_for_assign": [0, 1]}}
CLASSIFIER = {"name": "Classification", "backbone": RESNET, "num_classes": CLASSES}
# float32 sums in another order (our pool before the MLP, v1's in the neck)
TOLERANCE = 1e-5


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name, *args):
    """A tool's exit code, stdout and stderr, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exit_:
        run_cli(load_tool(name).main, [str(a) for a in args])
    return exit_.value.code, out.getvalue(), err.getvalue()


def write_config(directory, model, name):
    path = directory / name
    path.write_text(yaml.safe_dump({"model": model}))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """v1 models (eval mode) and the files v1 writes for them."""
    directory = tmp_path_factory.mktemp("passl_v1")
    paddle.seed(0)
    swav = v1.SwAV(DEPTH, HIDDEN, EMBEDDING, PROTOTYPES, **TRUNK)
    v1.randomise(swav, seed=1)
    v1.save_checkpoint(swav, 3, str(directory / "epoch_3.pdparams"))
    paddle.save(swav.state_dict(), str(directory / "swav_state.pdparams"))
    classifier = v1.Classification(DEPTH, CLASSES, **TRUNK)
    v1.randomise(classifier, seed=2)
    v1.save_checkpoint(classifier, 100, str(directory / "linear_epoch_100.pdparams"))
    v1.extract_weight(str(directory / "epoch_3.pdparams"),
                      str(directory / "v1_backbone.pdparams"))
    swav.eval()
    classifier.eval()
    images = paddle.to_tensor(np.random.default_rng(5).standard_normal((3, 3, 64, 64))
                              .astype("float32"))
    return {"dir": directory, "swav": swav, "classifier": classifier, "images": images}


def assert_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert float(np.abs(actual - expected).max()) / scale < TOLERANCE


def our_swav_outputs(model, images):
    model.eval()
    with paddle.no_grad():
        embeddings = model.neck(model.backbone(images))
        return embeddings.numpy(), model.head(embeddings)[0].numpy()


def v1_swav_outputs(files):
    with paddle.no_grad():
        embeddings, scores = files["swav"].embeddings_and_scores(files["images"])
    return embeddings.numpy(), scores.numpy()


@pytest.mark.parametrize("name", ["epoch_3.pdparams", "swav_state.pdparams"])
def test_swav_tensors_map_one_to_one(files, name):
    """Every v1 tensor lands, unchanged, on the layer of ours that plays its part."""
    path = str(files["dir"] / name)
    found = recognise(load_paddle_file(path, "test"), path)
    state, line = model_state(found)
    ours = MODELS.build(SWAV).state_dict()
    assert sorted(state) == sorted(ours)
    expected = files["swav"].state_dict()
    renamed = {"neck.mlp.1._mean": "neck.projection_neck.1._mean",
               "neck.mlp.3.weight": "neck.projection_neck.3.weight",
               "head.heads.0.weight": "head.prototypes.weight",
               "backbone.layer2.0.downsample.1._mean": "backbone.layer2.0.downsample.1._mean"}
    for our_name, v1_name in renamed.items():
        np.testing.assert_array_equal(np.asarray(state[our_name]), expected[v1_name].numpy())
    epoch = " (epoch 3)" if name.startswith("epoch") else ""
    kind = "checkpoint" if epoch else "state dict"
    assert line == (f"{path}: a PASSL v1 SwAV pretraining {kind}{epoch}; mapped backbone.* as "
                    f"they are (60), neck.projection_neck.* -> neck.mlp.* (8), "
                    f"head.prototypes.* -> head.heads.0.* (1)")


def test_load_swav_checkpoint_gives_v1_outputs(files):
    model = MODELS.build(SWAV)
    epoch = load_model_weights(model, str(files["dir"] / "epoch_3.pdparams"))
    assert epoch == 3
    for ours, theirs in zip(our_swav_outputs(model, files["images"]), v1_swav_outputs(files)):
        assert_close(ours, theirs)


def test_load_linear_checkpoint_gives_v1_logits(files):
    model = MODELS.build(CLASSIFIER)
    assert load_model_weights(model, str(files["dir"] / "linear_epoch_100.pdparams")) == 100
    model.eval()
    with paddle.no_grad():
        logits = model((files["images"], paddle.zeros([3], "int64")))["logits"]
        expected = files["classifier"](files["images"])
    assert_close(logits.numpy(), expected.numpy())


@pytest.mark.parametrize("name", ["epoch_3.pdparams", "v1_backbone.pdparams",
                                  "linear_epoch_100.pdparams"])
def test_pretrained_takes_v1_files_as_they_are(files, name):
    """A v1 checkpoint, v1's extracted weights: --pretrained loads the backbone of either."""
    backbone = BACKBONES.build(dict(RESNET))
    report = load_pretrained(backbone, str(files["dir"] / name))
    assert report["missing"] == [] and report["unexpected"] == []
    source = files["classifier" if name.startswith("linear") else "swav"].backbone
    backbone.eval()
    with paddle.no_grad():
        expected = paddle.flatten(paddle.nn.functional.adaptive_avg_pool2d(
            source(files["images"]), 1), 1)
        assert_close(backbone(files["images"]).numpy(), expected.numpy())


def test_extract_weight_on_a_v1_checkpoint(files, tmp_path):
    output = tmp_path / "backbone.pdparams"
    code, out, err = run_tool("extract_weight", files["dir"] / "epoch_3.pdparams",
                              "--output", output, "--remove_prefix")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("a PASSL v1 SwAV pretraining checkpoint (epoch 3); mapped "
                             "backbone.* as they are (60), neck.projection_neck.* -> "
                             "neck.mlp.* (8), head.prototypes.* -> head.heads.0.* (1)")
    assert lines[1].startswith("wrote 60 tensors")
    written = paddle.load(str(output))
    expected = files["swav"].backbone.state_dict()
    assert sorted(written) == sorted(expected)
    for name, tensor in written.items():
        np.testing.assert_array_equal(tensor.numpy(), expected[name].numpy())


@pytest.mark.parametrize("target, source, config", [
    ("swav", "epoch_3.pdparams", SWAV),
    ("classifier", "linear_epoch_100.pdparams", CLASSIFIER),
    ("backbone", "epoch_3.pdparams", CLASSIFIER),
])
def test_convert_weights_recognises_v1_files(files, tmp_path, target, source, config):
    output = tmp_path / f"{target}.pdparams"
    code, out, err = run_tool("convert_weights", files["dir"] / source, "--model", target,
                              "--output", output, "-c", write_config(tmp_path, config, "m.yaml"))
    assert code == 0, err
    assert "a PASSL v1 " in out.splitlines()[0]
    converted = paddle.load(str(output))
    if target == "backbone":
        model = BACKBONES.build(dict(RESNET))
        assert list(converted) == list(model.state_dict())
        assert "backbone.* without the prefix (60); left out 9 not part of --model backbone" \
            in out
        return
    model = MODELS.build(config)
    model.set_state_dict(converted)
    if target == "swav":
        for ours, theirs in zip(our_swav_outputs(model, files["images"]),
                                v1_swav_outputs(files)):
            assert_close(ours, theirs)
    else:
        model.eval()
        with paddle.no_grad():
            assert_close(model.fc(model.backbone(files["images"])).numpy(),
                         files["classifier"](files["images"]).numpy())


@pytest.mark.parametrize("case, fragments", [
    ("classifier_from_swav", ["SwAV pretraining checkpoint (epoch 3) has no linear classifier",
                              "--model backbone"]),
    ("swav_from_linear", ["linear-evaluation checkpoint (epoch 100) has no SwAV projection"]),
    ("from_v1_on_pytorch", ["swav_tiny_zip.pth: not a PASSL v1 file"]),
    ("two_files", ["2 files given: a PASSL v1 file converts alone"]),
])
def test_convert_weights_errors(files, tmp_path, case, fragments):
    source = files["dir"] / ("linear_epoch_100.pdparams" if case == "swav_from_linear"
                             else "epoch_3.pdparams")
    args = {"classifier_from_swav": [source, "--model", "classifier"],
            "swav_from_linear": [source, "--model", "swav"],
            "from_v1_on_pytorch": [os.path.join(ROOT, "tests", "fixtures", "swav_tiny_zip.pth"),
                                   "--from", "passl-v1"],
            "two_files": [source, source]}[case]
    output = tmp_path / "out.pdparams"
    code, _, err = run_tool("convert_weights", *args, "--output", output,
                            "-c", write_config(tmp_path, SWAV, "m.yaml"))
    assert code == 2
    assert_one_line_error(code, err, *fragments)
    assert not output.exists()


def test_load_says_where_a_v1_file_does_fit(files):
    """A v1 SwAV checkpoint is no classifier (and the reverse): --load says which tensors
    miss and which config the file is for."""
    with pytest.raises(UserError, match=r"SwAV pretraining checkpoint \(epoch 3\) does not "
                                        r"fill this config's model \(2 tensors missing: "
                                        r"fc.weight, fc.bias\); it loads into a SwAV config"):
        load_model_weights(MODELS.build(CLASSIFIER), str(files["dir"] / "epoch_3.pdparams"))
    with pytest.raises(UserError, match="it loads into a Classification config"):
        load_model_weights(MODELS.build(SWAV), str(files["dir"] / "linear_epoch_100.pdparams"))


def test_load_and_pretrained_log_what_they_recognised(files):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger, level = get_logger(), get_logger().level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        load_model_weights(MODELS.build(CLASSIFIER),
                           str(files["dir"] / "linear_epoch_100.pdparams"))
        load_pretrained(BACKBONES.build(dict(RESNET)), str(files["dir"] / "epoch_3.pdparams"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [record.getMessage() for record in records]
    assert lines[0].endswith("a PASSL v1 linear-evaluation checkpoint (epoch 100); mapped "
                             "backbone.* as they are (60), head.fc_cls.* -> fc.* (2)")
    assert lines[1].endswith("a PASSL v1 SwAV pretraining checkpoint (epoch 3); took "
                             "backbone.* without the prefix (60); left out the other 9 (not "
                             "backbone)")


@pytest.mark.slow
def test_full_size_resnet50_swav_checkpoint(tmp_path):
    """v1's own ResNet-50 SwAV (2048-2048-128, 3000 prototypes) saved by its hook: extracted,
    loaded with --load and --pretrained, and the outputs equal v1's."""
    paddle.seed(0)
    swav = v1.SwAV(50, 2048, 128, 3000)
    v1.randomise(swav, seed=3)
    checkpoint = tmp_path / "epoch_100.pdparams"
    v1.save_checkpoint(swav, 100, str(checkpoint))
    swav.eval()
    images = paddle.to_tensor(np.random.default_rng(6).standard_normal((2, 3, 96, 96))
                              .astype("float32"))
    with paddle.no_grad():
        expected = [t.numpy() for t in swav.embeddings_and_scores(images)]

    config = load_config(os.path.join(ROOT, "configs", "swav", "swav_r50_100ep.yaml"))
    model = MODELS.build(config.model)
    assert load_model_weights(model, str(checkpoint)) == 100
    for ours, theirs in zip(our_swav_outputs(model, images), expected):
        assert_close(ours, theirs)

    output = tmp_path / "backbone.pdparams"
    code, out, err = run_tool("extract_weight", checkpoint, "--output", output,
                              "--remove_prefix")
    assert code == 0, err
    assert "a PASSL v1 SwAV pretraining checkpoint (epoch 100); mapped backbone.* as they are " \
           "(265), neck.projection_neck.* -> neck.mlp.* (8), head.prototypes.* -> " \
           "head.heads.0.* (1)" in out
    backbone = BACKBONES.build({"name": "ResNet", "depth": 50})
    assert load_pretrained(backbone, str(output))["missing"] == []
