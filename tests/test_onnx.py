"""ONNX: export --format onnx, predict with onnxruntime (same output, same CLI as a Paddle
export), onnxruntime as a feature engine, and .onnx files from others checked first.

Tests that run ONNX models skip when onnxruntime or paddle2onnx is missing (the ``[onnx]``
extra); the checks of crafted files need only the onnx package.
"""
import importlib.util
import os
import sys

import cv2
import numpy as np
import paddle
import pytest
import yaml

from passl.config import load_config
from passl.errors import UserError
from passl.models import MODELS
from test_cli import assert_one_line_error
from test_deploy import EXPORT, PREDICT, relative_difference, run_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(ROOT, "configs", "swav", "swav_clas_r18_digits.yaml")
NARROW = ["-o", "model.backbone.base_width=8"]
ONNX_TOLERANCE = 1e-4  # relative, float32 (measured ~1e-7 here)
RUNTIME_MISSING = [name for name in ("onnx", "onnxruntime", "paddle2onnx")
                   if importlib.util.find_spec(name) is None]
needs_runtime = pytest.mark.skipif(bool(RUNTIME_MISSING), reason=f"no {RUNTIME_MISSING} "
                                   f"(pip install -e '.[onnx]')")
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnx") is None,
                                reason="no onnx package (pip install -e '.[onnx]')")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random narrow digits classifier (whole model and backbone), and a few images."""
    base = tmp_path_factory.mktemp("onnx")
    paddle.seed(0)
    model = MODELS.build(load_config(DIGITS_CONFIG, NARROW[1::2]).model)
    paddle.save(model.state_dict(), str(base / "classifier.pdparams"))
    paddle.save(model.backbone.state_dict(), str(base / "backbone.pdparams"))
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (40, 30, 3), np.uint8))
    return {"base": base, "images": images}


@needs_runtime
@pytest.mark.parametrize("weights_flag, file", [
    ("--load", "classifier.pdparams"),
    pytest.param("--pretrained", "backbone.pdparams", marks=pytest.mark.slow)])
def test_onnx_export_predicts_as_the_paddle_export(weights, capsys, weights_flag, file):
    """Same inference.yml, same outputs (1e-4), and for a classifier the same printed lines."""
    base = weights["base"]
    exports = {}
    for model_format in ("paddle", "onnx"):
        directory = base / f"{file}-{model_format}"
        code, out, err = run_tool(EXPORT, ["-c", DIGITS_CONFIG, *NARROW, weights_flag,
                                           base / file, "--output", directory,
                                           "--format", model_format], capsys)
        assert code == 0, err
        exports[model_format] = directory
    assert sorted(os.listdir(exports["onnx"])) == ["inference.yml", "model.onnx"]
    metas = {kind: yaml.safe_load((exports[kind] / "inference.yml").read_text())
             for kind in ("onnx", "paddle")}
    assert set(metas["onnx"].pop("sha256")) == {"model.onnx"}  # each lists its own files
    assert set(metas["paddle"].pop("sha256")) == {"model.json", "model.pdiparams"}
    assert metas["onnx"] == metas["paddle"]
    outputs, printed = {}, {}
    for model_format, directory in exports.items():
        features = base / f"{file}-{model_format}.npy"
        code, _, err = run_tool(PREDICT, [directory, weights["images"], "--features", features],
                                capsys)
        assert code == 0, err
        outputs[model_format] = np.load(features)
        if weights_flag == "--load":
            code, printed[model_format], err = run_tool(
                PREDICT, [directory, weights["images"], "--topk", "3"], capsys)
            assert code == 0, err
    assert outputs["onnx"].shape == outputs["paddle"].shape == (3, outputs["paddle"].shape[1])
    assert relative_difference(outputs["onnx"], outputs["paddle"]) <= ONNX_TOLERANCE
    assert printed.get("onnx") == printed.get("paddle")


def test_missing_packages_are_one_line(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # import fails as if not installed
    output = tmp_path / "export"
    code, _, err = run_tool(EXPORT, ["-c", DIGITS_CONFIG, *NARROW, "--pretrained",
                                     weights["base"] / "backbone.pdparams", "--output", output,
                                     "--format", "onnx"], capsys)
    assert_one_line_error(code, err, "--format onnx needs paddle2onnx, which is not installed",
                          'pip install -e ".[onnx]"')
    assert not output.exists()


@needs_runtime
@pytest.mark.parametrize("engine", ["knn", "backbone_engine"])
def test_onnxruntime_engine_gives_dygraph_features(engine):
    from passl.evaluation.knn import feature_function
    paddle.seed(1)
    cfg = load_config(DIGITS_CONFIG, NARROW[1::2])
    images = paddle.to_tensor(np.random.default_rng(2).standard_normal((4, 3, 32, 32))
                              .astype("float32"))
    model = MODELS.build(cfg.model)
    model.eval()
    with paddle.no_grad():
        expected = model.fc(model.extract_features(images)).numpy()
    if engine == "knn":
        features = feature_function(model, "onnxruntime")(images)
        actual = model.fc(features).numpy()
    else:
        fast = MODELS.build({**cfg.model.to_dict(), "backbone_engine": "onnxruntime"})
        fast.set_state_dict(model.state_dict())
        fast.eval()
        with paddle.no_grad():
            actual = fast((images, paddle.zeros([4], "int64")))["logits"].numpy()
    assert relative_difference(actual, expected) <= ONNX_TOLERANCE


# ---------------------------------------------------------------- .onnx files from others

def identity_model(path, weight_tensor, node_domain="", opset_domain=""):
    """``y = x + w``: one Add node (of ``node_domain``) and one initializer ``w``."""
    import onnx
    from onnx import TensorProto, helper
    node = helper.make_node("Add", ["x", "w"], ["y"], domain=node_domain)
    graph = helper.make_graph(
        [node], "crafted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [weight_tensor])
    opsets = [helper.make_opsetid("", 13)]
    if opset_domain:
        opsets.append(helper.make_opsetid(opset_domain, 1))
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return str(path)


def external_weight(location):
    """An initializer ``w`` whose 8 bytes are read from the file ``location``."""
    from onnx import TensorProto
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@pytest.fixture
def untouched_session(monkeypatch):
    """onnxruntime's session constructor replaced by one that fails the test: a refused
    model must be refused before any session sees it."""
    ort = pytest.importorskip("onnxruntime")

    def refuse(*args, **kwargs):
        raise AssertionError("an InferenceSession was created for a refused model")
    monkeypatch.setattr(ort, "InferenceSession", refuse)


@needs_onnx
@pytest.mark.parametrize("case, fragments", [
    ("parent", ["'../secret.bin'", "outside the model's directory"]),
    ("absolute", ["an absolute path", "external data must be files inside"]),
    ("symlink", ["'link.bin'", "outside the model's directory"]),
    ("custom_domain", ["com.microsoft.Add", "only standard ONNX operators"]),
    ("custom_opset", ["evil.ops", "outside the standard ONNX domain"]),
    ("not_onnx", ["not an ONNX model"]),
])
def test_crafted_models_are_refused_before_a_session(tmp_path, untouched_session, case,
                                                     fragments):
    from onnx import numpy_helper
    from passl.deploy.onnx_runtime import OnnxEngine
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.array([7, 7], np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    inline = numpy_helper.from_array(np.ones(2, np.float32), "w")
    if case == "parent":
        identity_model(path, external_weight("../secret.bin"))
    elif case == "absolute":
        identity_model(path, external_weight(str(secret)))
    elif case == "symlink":
        os.symlink(secret, folder / "link.bin")
        identity_model(path, external_weight("link.bin"))
    elif case == "custom_domain":
        identity_model(path, inline, node_domain="com.microsoft", opset_domain="com.microsoft")
    elif case == "custom_opset":
        identity_model(path, inline, opset_domain="evil.ops")
    else:
        path.write_bytes(b"\x00not a protobuf at all\xff" * 10)
    with pytest.raises(UserError) as refused:
        OnnxEngine(str(path), device="cpu")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"ONNX model {path}")
    for fragment in fragments:
        assert fragment in message


@needs_onnx
def test_a_custom_operator_inside_a_subgraph_is_found(tmp_path):
    from onnx import TensorProto, helper
    from passl.io.onnx_model import check_onnx_model
    branch = helper.make_graph(
        [helper.make_node("Evil", ["x"], ["z"], domain="ai.evil")], "branch", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node], "outer", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                          helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    import onnx
    path = str(tmp_path / "nested.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(UserError, match=r"ai\.evil\.Evil"):
        check_onnx_model(path)


@needs_runtime
def test_external_data_inside_the_folder_runs(tmp_path):
    """The check refuses only what leaves the folder: data beside the model loads."""
    from passl.deploy.onnx_runtime import OnnxEngine
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(np.array([1.5, -2], np.float32).tobytes())
    path = identity_model(tmp_path / "model.onnx", external_weight("weights/w.bin"))
    output = OnnxEngine(path, device="cpu")(np.array([1, 1], np.float32))
    np.testing.assert_array_equal(output, [2.5, -1])


@needs_runtime
def test_predict_refuses_a_crafted_export(weights, tmp_path, capsys):
    directory = tmp_path / "export"
    code, _, err = run_tool(EXPORT, ["-c", DIGITS_CONFIG, *NARROW, "--pretrained",
                                     weights["base"] / "backbone.pdparams", "--output",
                                     directory, "--format", "onnx"], capsys)
    assert code == 0, err
    identity_model(directory / "model.onnx", external_weight("/etc/hostname"))
    code, _, err = run_tool(PREDICT, [directory, weights["images"], "--features",
                                      tmp_path / "f.npy"], capsys)
    assert_one_line_error(code, err, "model.onnx: refused", "'/etc/hostname'")
    assert not (tmp_path / "f.npy").exists()
