"""A model directory is a program: predict runs only the operators our exporter writes, never
one that touches files, and checks inference.yml's sizes before allocating anything."""
import importlib.util
import json
import os
import shutil

import cv2
import numpy as np
import paddle
import pytest
import yaml
from paddle.pir_utils import OldIrGuard

from passl.config import load_config
from passl.deploy.engine import ModelFeatures, save_static
from passl.deploy.export import ClassifierLogits
from passl.deploy.predict import Predictor
from passl.errors import UserError
from passl.io.inference_model import (EXPORTED_OPS, META_FILE, check_graph, file_sha256,
                                      graph_operators, model_prefix, write_meta)
from passl.models import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(ROOT, "configs", "swav", "swav_clas_r18_digits.yaml")
SMALL = ["model.backbone.base_width=8"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREDICT = load_tool("predict")


def run_predict(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PREDICT.run_cli(PREDICT.main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def classifier(overrides=()):
    paddle.seed(0)
    return MODELS.build(load_config(DIGITS_CONFIG, SMALL + list(overrides)).model)


def export_dir(directory, legacy=False):
    """What tools/export_model.py writes for a (random) digits classifier: the graph in
    Paddle 3's JSON, or (``legacy``) an older Paddle's protobuf ``model.pdmodel``."""
    os.makedirs(directory)
    with paddle.utils.unique_name.guard():  # the same tensor names (and bytes) in any process
        layer = ClassifierLogits(classifier())
    if legacy:
        with OldIrGuard():
            save_static(layer, model_prefix(directory), [-1, 3, 32, 32])
    else:
        save_static(layer, model_prefix(directory), [-1, 3, 32, 32])
    write_meta(directory, "logits", [-1, 3, 32, 32], [{"name": "Normalize", "to_chw": True}],
               [str(d) for d in range(10)])
    return str(directory)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("model_dirs")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
    return {"pir": export_dir(base / "pir"), "legacy": export_dir(base / "legacy", legacy=True),
            "images": str(images)}


def restamp(directory):
    """Put the files' new sha256 into inference.yml, as whoever crafts a directory would."""
    meta_path = os.path.join(directory, META_FILE)
    with open(meta_path) as f:
        meta = yaml.safe_load(f)
    meta["sha256"] = {name: file_sha256(os.path.join(directory, name)) for name in meta["sha256"]}
    with open(meta_path, "w") as f:
        yaml.safe_dump(meta, f)
    return str(directory)


def with_save_op(legacy_dir, target, tmp_path):
    """A copy of ``legacy_dir`` whose graph ends in a ``save`` op that writes a weight of
    the model to ``target`` (the attack: a .pth file in a site-packages runs at Python's
    next start)."""
    from paddle.base.proto import framework_pb2
    evil = tmp_path / "evil"
    shutil.copytree(legacy_dir, evil)
    graph = evil / "model.pdmodel"
    program = framework_pb2.ProgramDesc.FromString(graph.read_bytes())
    block = program.blocks[0]
    weight = next(v.name for v in block.vars if v.persistable and v.name not in ("feed", "fetch"))
    op = block.ops.add()
    op.type = "save"
    source = op.inputs.add()
    source.parameter = "X"
    source.arguments.append(weight)
    path = op.attrs.add()
    path.name, path.type, path.s = "file_path", framework_pb2.STRING, str(target)
    overwrite = op.attrs.add()
    overwrite.name, overwrite.type, overwrite.b = "overwrite", framework_pb2.BOOLEAN, True
    graph.write_bytes(program.SerializeToString())
    return restamp(evil)


def test_every_exportable_model_uses_only_the_allowed_operators(tmp_path):
    """The allow-list is what the exporter writes: every backbone option that changes the
    graph (stem, NHWC, pool grid), features and logits, both formats. (Bottleneck blocks,
    depth 50 and up, use the same operators as these basic blocks.)"""
    variants = [[], ["model.backbone.stem=imagenet", "+model.backbone.data_format=NHWC",
                     "+model.backbone.pool_size=2"]]
    seen = {"pir": set(), "legacy": set()}
    for i, overrides in enumerate(variants):
        model = classifier(overrides)
        layers = (("features", ModelFeatures(model)), ("logits", ClassifierLogits(model)))
        for what, layer in layers:
            for legacy in (False, True):
                prefix = str(tmp_path / f"{i}{what}{legacy}" / "model")
                with OldIrGuard() if legacy else paddle.no_grad():
                    graph, _ = save_static(layer, prefix, [-1, 3, 32, 32])
                check_graph(graph)
                kind, names = graph_operators(graph)
                seen[kind] |= set(names)
    assert seen == {kind: set(ops) for kind, ops in EXPORTED_OPS.items()}  # none is unused


def test_a_save_op_in_the_graph_is_refused_and_writes_nothing(exports, tmp_path, capsys):
    target = tmp_path / "site-packages" / "evil.pth"
    target.parent.mkdir()
    evil = with_save_op(exports["legacy"], target, tmp_path)

    # what predict did before it checked the graph: Paddle Inference runs the save op
    config = paddle.inference.Config(os.path.join(evil, "model.pdmodel"),
                                     os.path.join(evil, "model.pdiparams"))
    config.disable_gpu()
    config.disable_glog_info()
    predictor = paddle.inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape([1, 3, 32, 32])
    handle.copy_from_cpu(np.zeros((1, 3, 32, 32), np.float32))
    predictor.run()
    assert target.stat().st_size > 0
    target.unlink()

    for extra in ([], ["--trust-model"]):
        code, out, err = run_predict([evil, exports["images"], *extra], capsys)
        lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
        assert (code, lines) == (2, [
            f"error: {evil}/model.pdmodel: operator 'save' reads or writes files, prints or "
            f"runs Python; a model graph with it is refused, also with --trust-model"])
        assert not target.exists() and out == ""
    assert err.startswith("warning: --trust-model: running the graph in ")


def rewrite_first_op(pir_dir, tmp_path, new_name, old_name="1.relu"):
    """A copy of a PIR export with its first ``old_name`` op renamed to ``new_name``."""
    copy = tmp_path / new_name.replace(".", "_")
    shutil.copytree(pir_dir, copy)
    text = (copy / "model.json").read_text()
    (copy / "model.json").write_text(text.replace(f'"#":"{old_name}"', f'"#":"{new_name}"', 1))
    return restamp(copy)


def test_a_changed_graph_or_weights_file_is_named(exports, tmp_path):
    for name in ("model.json", "model.pdiparams"):
        copy = tmp_path / name
        shutil.copytree(exports["pir"], copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 1
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(UserError) as error:
            Predictor(str(copy))
        assert str(error.value) == (f"{copy / name}: differs from the file exported (sha256 in "
                                    f"{META_FILE}); a damaged or edited copy: copy or export the "
                                    f"model again")


def test_pir_graphs_are_read_as_data_and_unknown_ops_named(exports, tmp_path, capsys):
    saving = rewrite_first_op(exports["pir"], tmp_path, "1.save_combine")
    code, _, err = run_predict([saving, exports["images"]], capsys)
    assert code == 2 and err.strip().startswith(
        f"error: {saving}/model.json: operator 'pd_op.save_combine' reads or writes files")

    other = rewrite_first_op(exports["pir"], tmp_path, "1.exp")
    code, _, err = run_predict([other, exports["images"]], capsys)
    assert (code, err.strip()) == (2, (
        f"error: {other}/model.json: operator 'pd_op.exp' is not one tools/export_model.py "
        f"writes, so this model is not run; re-export it with tools/export_model.py, or pass "
        f"--trust-model if you trust who made it"))
    check_graph(os.path.join(other, "model.json"), trust=True)  # --trust-model lets it run

    nested = tmp_path / "nested.json"  # an op hidden in a nested block is found too
    program = json.loads((tmp_path / "1_exp" / "model.json").read_text().replace(
        '"#":"1.exp"', '"#":"1.relu"'))
    program["program"]["regions"][0]["blocks"][0]["ops"][-1]["regions"] = [
        {"blocks": [{"ops": [{"#": "1.print"}]}]}]
    nested.write_text(json.dumps(program))
    with pytest.raises(UserError, match="operator 'pd_op.print' reads or writes files"):
        check_graph(str(nested), trust=True)
    for garbage in (b"\x00\xff not json", b"[" * 100000):
        (tmp_path / "garbage.json").write_bytes(garbage)
        with pytest.raises(UserError, match="garbage.json: not valid JSON"):
            check_graph(str(tmp_path / "garbage.json"))


def edited_meta(exported, tmp_path, name, edit):
    copy = tmp_path / name
    shutil.copytree(exported, copy)
    meta = yaml.safe_load((copy / META_FILE).read_text())
    edit(meta)
    (copy / META_FILE).write_text(yaml.safe_dump(meta))
    return str(copy)


def test_inference_yml_bounds_are_checked_before_allocating(exports, tmp_path, capsys):
    huge = edited_meta(exports["pir"], tmp_path, "huge",
                       lambda m: m["input"].update(shape=[400000, 3, 32, 32]))
    code, out, err = run_predict([huge, exports["images"]], capsys)
    assert (code, err.strip()) == (2, (
        f"error: {huge}/{META_FILE}: input.shape [400000, 3, 32, 32]: outside what predict runs "
        f"(batch -1 or 1..1024, 3 channels, sides 1..4096, at most 1024 MB a batch); re-export "
        f"the model"))
    cases = {
        "side": (lambda m: m["input"].update(shape=[-1, 3, 100000, 32]), "outside what predict"),
        "batch_bytes": (lambda m: m["input"].update(shape=[1024, 3, 4096, 4096]),
                        "at most 1024 MB a batch"),
        "shape_type": (lambda m: m["input"].update(shape="big"), "expected 4 integers"),
        "dtype": (lambda m: m["input"].update(dtype="float64"), "only float32 is exported"),
        "resize": (lambda m: m["transforms"].insert(0, {"name": "Resize", "size": [10**6, 32]}),
                   r"Resize.size \[1000000, 32\] is out of bounds \(at most 4096\)"),
        "blur": (lambda m: m["transforms"].insert(0, {"name": "GaussianBlur", "sigma": 1e9}),
                 "GaussianBlur.sigma 1000000000.0 is out of bounds"),
        "nested": (lambda m: m["transforms"].insert(0, {"name": "Resize", "size": [[1]]}),
                   "is not a number, string or list of them"),
        "names": (lambda m: m.update(class_names={"a": 1}), "class_names must be a list"),
        "version": (lambda m: m.update(version="2"), "version '2' is not an integer"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(UserError, match=message):
            Predictor(edited_meta(exports["pir"], tmp_path, name, edit))


def test_our_exports_predict_as_before(exports, capsys):
    """Both graph formats pass the check and give the same logits as the Paddle Inference
    predictor run on them directly."""
    for kind in ("pir", "legacy"):
        predictor = Predictor(exports[kind], device="cpu")
        files = sorted(os.path.join(exports["images"], n) for n in os.listdir(exports["images"]))
        _, logits = predictor.predict_files(files)
        graph = os.path.join(exports[kind], "model.json" if kind == "pir" else "model.pdmodel")
        config = paddle.inference.Config(graph, os.path.join(exports[kind], "model.pdiparams"))
        config.disable_gpu()
        raw = paddle.inference.create_predictor(config)
        batch = np.stack([predictor.preprocess(cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB))
                          for f in files])
        handle = raw.get_input_handle(raw.get_input_names()[0])
        handle.reshape(list(batch.shape))
        handle.copy_from_cpu(batch)
        raw.run()
        expected = raw.get_output_handle(raw.get_output_names()[0]).copy_to_cpu()
        np.testing.assert_array_equal(logits, expected)


def test_graphs_wired_unlike_an_export_are_refused_before_paddle_reads_them(exports, tmp_path):
    """Paddle Inference crashes (SIGSEGV) on such graphs instead of refusing them: a
    convolution without its filter, a value used after the op defining it was deleted."""
    with open(os.path.join(exports["pir"], "model.json")) as f:
        program = json.load(f)

    def drop_filter(ops):
        next(op for op in ops if op["#"] == "1.conv2d")["I"].pop()

    def delete_add(ops):
        ops.remove(next(op for op in ops if op["#"] == "1.add"))

    cases = {"conv2d without its filter": (drop_filter,
                                           "operator 'pd_op.conv2d' is wired with other inputs"),
             "a deleted op": (delete_add, "uses value %")}
    for name, (edit, message) in cases.items():
        edited = json.loads(json.dumps(program))
        edit(edited["program"]["regions"][0]["blocks"][0]["ops"])
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(edited))
        with pytest.raises(UserError, match=message):
            check_graph(str(path))
        check_graph(str(path), trust=True)  # --trust-model leaves it to Paddle
