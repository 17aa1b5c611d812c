"""Export -> Paddle Inference -> predict: same numbers as dygraph, same top-1 as
--evaluate-only on a quickly trained digits classifier, one clear line per bad input."""
import importlib.util
import os
from types import SimpleNamespace

import cv2
import numpy as np
import paddle
import pytest
import yaml

from passl.config import load_config
from passl.data import DATASETS, build_dataloader
from passl.deploy import engine as deploy_engine
from passl.deploy.engine import InferenceEngine, compile_layer
from passl.deploy.predict import Predictor, file_list_path
from passl.engine.trainer import Trainer
from passl.errors import ConfigError, UserError
from passl.evaluation.knn import extract_features, feature_function, knn_evaluate
from passl.evaluation.knn_eval import memory_bank_blocks
from passl.io.checkpoint import load_model_weights
from passl.io.inference_model import META_FILE, read_model_dir
from passl.models import MODELS
from tiny_image_folder import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(ROOT, "configs", "swav", "swav_clas_r18_digits.yaml")
TINY = ["-o", "model.backbone.base_width=8", "-o", "epochs=1", "-o", "log_interval=1000"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPORT, PREDICT = load_tool("export_model"), load_tool("predict")


def run_tool(tool, argv, capsys):
    """``(exit code, stdout, stderr)`` of a tool's run_cli in this process."""
    with pytest.raises(SystemExit) as exit_info:
        tool.run_cli(tool.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def relative_difference(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 1-epoch, width-8 digits classifier: its config, checkpoint, --evaluate-only top-1
    and its export."""
    base = tmp_path_factory.mktemp("deploy")
    overrides = TINY[1::2] + [f"output_dir={base / 'run'}"]
    cfg = load_config(DIGITS_CONFIG, overrides)
    Trainer(cfg).train()
    checkpoint = str(base / "run" / "checkpoints" / "latest.pd")
    top1 = Trainer(load_config(DIGITS_CONFIG, overrides), load=checkpoint,
                   evaluate_only=True).evaluate()["top1"]
    config_path = write_config(base / "digits.yaml", cfg.to_dict())
    return {"base": base, "config": config_path, "checkpoint": checkpoint, "top1": top1,
            "cfg": cfg}


def trained_model(digits):
    """The digits classifier with its checkpoint loaded by the toolkit's loader."""
    model = MODELS.build(digits["cfg"].model)
    load_model_weights(model, digits["checkpoint"])
    return model


@pytest.fixture(scope="module")
def exported(digits):
    directory = str(digits["base"] / "export")
    EXPORT.main(["-c", digits["config"], "--load", digits["checkpoint"], "--output", directory])
    return directory


def val_root(cfg):
    return DATASETS.build({**cfg.dataloader.val.dataset.to_dict(), "transforms": None}).root


def test_inference_yml_holds_preprocessing_and_class_names(exported):
    graph, params, meta = read_model_dir(exported)
    assert os.path.basename(graph) in ("model.json", "model.pdmodel")
    assert meta["output"] == "logits"
    assert meta["input"]["shape"] == [-1, 3, 32, 32]
    # the digits' val transforms keep the size, so export puts a Resize to 32x32 in front
    assert meta["transforms"] == [{"name": "Resize", "size": [32, 32]},
                                  {"name": "Normalize", "to_chw": True}]
    assert meta["class_names"] == [str(d) for d in range(10)]


def test_round_trip_gives_the_evaluate_only_top1(digits, exported, capsys):
    assert digits["top1"] > 30  # a trained model, so equal top-1 is not chance
    root = val_root(digits["cfg"])
    code, out, err = run_tool(PREDICT, [exported, root, "--topk", "3"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(DATASETS.build({**digits["cfg"].dataloader.val.dataset.to_dict(),
                                             "transforms": None}))
    hits = 0
    for line in lines:
        path, ranked = line.rsplit(": ", 1)
        first = ranked.split(" | ")
        assert len(first) == 3
        hits += first[0].split(" ")[0] == os.path.basename(os.path.dirname(path))
    assert 100.0 * hits / len(lines) == pytest.approx(digits["top1"], abs=1e-9)


def test_exported_logits_and_features_equal_dygraph(digits, exported, tmp_path):
    cfg = digits["cfg"]
    model = trained_model(digits)
    model.eval()
    images, _ = next(iter(build_dataloader(cfg.dataloader.val, mode="val")))
    with paddle.no_grad():
        features = model.extract_features(images).numpy()
        logits = model.fc(paddle.to_tensor(features)).numpy()

    graph, params, _ = read_model_dir(exported)
    assert relative_difference(InferenceEngine(graph, params, device="cpu")(images.numpy()),
                               logits) <= 1e-5

    weights = str(tmp_path / "backbone.pdparams")
    paddle.save(model.backbone.state_dict(), weights)
    features_dir = str(tmp_path / "features")
    EXPORT.main(["-c", digits["config"], "--pretrained", weights, "--output", features_dir,
                 "--batch-size", "4"])
    graph, params, meta = read_model_dir(features_dir)
    assert meta["output"] == "features" and meta["input"]["shape"] == [4, 3, 32, 32]
    assert "class_names" not in meta
    fixed = InferenceEngine(graph, params, device="cpu", onednn=False)
    assert relative_difference(fixed(images.numpy()[:4]), features[:4]) <= 1e-5


def test_features_file_fixed_batch_and_a_bad_image(digits, tmp_path, capsys):
    """--features writes one row per readable image in file order (fixed batch 4, padded),
    equal to dygraph features of the same files; the bad file is named and skipped."""
    cfg = digits["cfg"]
    model = trained_model(digits)
    model.eval()
    weights = str(tmp_path / "backbone.pdparams")
    paddle.save(model.backbone.state_dict(), weights)
    export_dir = str(tmp_path / "features")
    EXPORT.main(["-c", digits["config"], "--pretrained", weights, "--output", export_dir,
                 "--batch-size", "4"])

    folder = tmp_path / "mixed"
    folder.mkdir()
    root = val_root(cfg)
    sources = [os.path.join(root, label, sorted(os.listdir(os.path.join(root, label)))[0])
               for label in ("1", "4", "7", "9", "0")]
    for i, source in enumerate(sources):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.imread(source))
    (folder / "2b.png").write_text("not an image")
    out_path = str(tmp_path / "feats.npy")
    code, out, err = run_tool(PREDICT, [export_dir, str(folder), "--features", out_path], capsys)
    assert code == 0
    assert err.strip() == (f"skipped {folder / '2b.png'}: not an image file (neither OpenCV "
                           f"nor Pillow knows its format)")
    kept = [str(folder / f"{i}.png") for i in range(5)]
    with open(file_list_path(out_path)) as f:
        assert f.read().splitlines() == kept
    written = np.load(out_path)
    assert written.shape == (5, model.backbone.out_channels) and written.dtype == np.float32
    pixels = np.stack([cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in kept])
    images = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.228, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    with paddle.no_grad():
        expected = model.extract_features(paddle.to_tensor((images - mean) / std)).numpy()
    assert relative_difference(written, expected) <= 1e-5
    assert "wrote 5 x" in out and "skipped 1" in out


def test_bad_inputs_give_one_line_each(digits, exported, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 10)
    cases = [
        ([str(tmp_path / "nowhere"), str(empty)],
         f"error: model dir {tmp_path / 'nowhere'}: not found; export one with "
         f"tools/export_model.py -c CFG --load CKPT --output DIR"),
        ([str(empty), str(bad)], f"error: model dir {empty}: no model.json or model.pdmodel, "
                                 f"model.pdiparams, inference.yml; not an exported model; "
                                 f"export one with tools/export_model.py -c CFG --load CKPT "
                                 f"--output DIR"),
        ([exported, str(empty)], f"error: folder {empty}: no image files (.jpg, .jpeg, .png, "
                                 f".ppm, .pgm, .bmp, .tif, .tiff, .webp, .gif); pass a folder "
                                 f"with images or image files"),
    ]
    for argv, line in cases:
        code, out, err = run_tool(PREDICT, argv, capsys)
        assert (code, err.strip()) == (2, line)
    code, out, err = run_tool(PREDICT, [exported, str(bad)], capsys)
    skipped, error = err.strip().splitlines()
    assert code == 2 and skipped.startswith(f"skipped {bad}: ")
    assert error == "error: none of the 1 input(s) is a readable image"

    wider = ["-o", "model.backbone.base_width=16"]
    code, out, err = run_tool(EXPORT, ["-c", digits["config"], *wider, "--load",
                                       digits["checkpoint"], "--output",
                                       str(tmp_path / "x")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: --load {digits['checkpoint']}: the checkpoint's model does "
                          f"not fit this config's model: ")
    assert not os.path.exists(tmp_path / "x")
    code, out, err = run_tool(EXPORT, ["-c", digits["config"], "--load", digits["checkpoint"],
                                       "--output", exported], capsys)
    assert (code, err.strip()) == (2, f"error: --output {exported}: directory is not empty; "
                                      f"choose a new one or pass --overwrite")


def test_model_dir_versions_are_checked(exported, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    meta_path = copy / META_FILE
    meta = yaml.safe_load(meta_path.read_text())
    meta["version"] = 99
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(UserError, match=r"version 99 is newer than this code reads \(1\)"):
        Predictor(str(copy))


def test_knn_with_the_inference_engine_matches_dygraph(digits):
    """Same kNN numbers and features within 1e-5 relative, on the digits config."""
    cfg = digits["cfg"]
    model = trained_model(digits)
    bank_block, query_block = memory_bank_blocks(cfg)
    loaders = [build_dataloader(block, mode="val") for block in (bank_block, query_block)]
    dygraph = knn_evaluate(model, *loaders)
    fast = knn_evaluate(model, *loaders, engine="inference")
    assert fast == dygraph
    queries, _ = extract_features(model, loaders[1])
    fast_queries, _ = extract_features(model, loaders[1],
                                       features_of=feature_function(model, "inference"))
    assert relative_difference(fast_queries.numpy(), queries.numpy()) <= 1e-5
    with pytest.raises(UserError, match="kNN engine 'onnx': expected one of dygraph, "
                                        "inference, onnxruntime"):
        feature_function(model, "onnx")


def test_compiled_layer_is_a_frozen_copy_and_leaves_modes_alone():
    layer = paddle.nn.Sequential(paddle.nn.Linear(3, 2), paddle.nn.BatchNorm1D(2))
    layer.train()
    x = np.random.default_rng(0).standard_normal((5, 3)).astype("float32")
    engine = compile_layer(layer, [-1, 3], device="cpu")
    assert all(sub.training for sub in layer.sublayers(include_self=True))
    layer.eval()
    with paddle.no_grad():
        expected = layer(paddle.to_tensor(x)).numpy()
    assert relative_difference(engine(x), expected) <= 1e-5
    layer[0].weight.set_value(layer[0].weight * 2)
    assert relative_difference(engine(x), expected) <= 1e-5


def test_a_gpu_predictor_runs_on_the_card_the_launcher_selected(monkeypatch):
    """`launch --gpus 4,5`: rank 0 trains on card 4 (FLAGS_selected_gpus=4) while its local
    rank is 0; its predictor (kNN, backbone_engine: inference) must use card 4 too."""
    cards = []

    class Config:  # Paddle Inference's config, recording the card instead of needing one
        def __init__(self, *files):
            pass

        def disable_glog_info(self):
            pass

        def enable_use_gpu(self, pool_mb, card):
            cards.append(card)
    predictor = SimpleNamespace(get_input_names=lambda: ["images"],
                                get_output_names=lambda: ["features"],
                                get_input_handle=lambda name: name,
                                get_output_handle=lambda name: name)
    monkeypatch.setattr(paddle.inference, "Config", Config)
    monkeypatch.setattr(paddle.inference, "create_predictor", lambda config: predictor)
    monkeypatch.setattr(deploy_engine, "has_gpu", lambda: True)
    monkeypatch.setattr(paddle.base.core, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setenv("FLAGS_selected_gpus", "4")
    monkeypatch.setenv("PADDLE_LOCAL_RANK", "0")
    monkeypatch.setattr(deploy_engine, "check_graph", lambda graph, trust=False: None)
    assert InferenceEngine("model.json", "model.pdiparams", device="gpu").device == "gpu"
    assert cards == [4]


def test_export_builds_its_dygraph_reference_on_the_cpu(digits, tmp_path, monkeypatch, capsys):
    """Where a GPU is Paddle's default device, a reference run there would use TF32 (Ampere and
    newer: 1e-4..1e-3 off) against the 1e-5 check: the tool sets the CPU before it builds."""
    import passl.deploy.export as export
    devices, seen = ["gpu:0"], []
    monkeypatch.setattr(paddle, "set_device", devices.append)

    def export_model(cfg, output, **options):  # records the device the model is built on
        seen.append(devices[-1])
        return {"output": "logits", "input_shape": [-1, 3, 32, 32], "relative_error": 0.0,
                "classes": 0, "meta": os.path.join(output, "inference.yml")}
    monkeypatch.setattr(export, "export_model", export_model)
    code, _, _ = run_tool(EXPORT, ["-c", digits["config"], "--load", digits["checkpoint"],
                                   "--output", str(tmp_path / "out")], capsys)
    assert (code, seen) == (0, ["cpu"])


def test_frozen_backbone_engine_gives_the_dygraph_step(digits, tmp_path):
    """backbone_engine: inference trains the linear layer on the same features (1e-5) and
    compiles again after set_state_dict."""
    block = {**digits["cfg"].model.to_dict(), "backbone_engine": "inference"}
    fast, reference = MODELS.build(block), trained_model(digits)
    fast.set_state_dict(reference.state_dict())
    fast.train(), reference.train()
    images = paddle.to_tensor(np.random.default_rng(1).standard_normal((6, 3, 32, 32))
                              .astype("float32"))
    labels = paddle.to_tensor(np.arange(6).reshape(6, 1))
    outputs = [model((images, labels)) for model in (fast, reference)]
    for out in outputs:
        out["loss"].backward()
    assert abs(float(outputs[0]["loss"]) - float(outputs[1]["loss"])) <= 1e-5 * float(
        outputs[1]["loss"])
    assert relative_difference(fast.fc.weight.grad.numpy(),
                               reference.fc.weight.grad.numpy()) <= 1e-5
    assert fast.backbone.conv1.weight.grad is None  # the frozen backbone gets no gradient

    paddle.seed(5)
    other = MODELS.build(digits["cfg"].model.to_dict())
    fast.set_state_dict(other.state_dict())
    fast.eval(), other.eval()
    with paddle.no_grad():
        assert relative_difference(fast.extract_features(images).numpy(),
                                   other.extract_features(images).numpy()) <= 1e-5

    # exporting such a model traces the dygraph backbone
    directory = str(tmp_path / "export")
    EXPORT.main(["-c", digits["config"], "--load", digits["checkpoint"], "--output", directory,
                 "-o", "+model.backbone_engine=inference"])
    graph, params, _ = read_model_dir(directory)
    with paddle.no_grad():
        expected = reference.fc(reference.extract_features(images)).numpy()
    assert relative_difference(InferenceEngine(graph, params)(images.numpy()), expected) <= 1e-5

    with pytest.raises(ConfigError, match="backbone_engine: inference runs a frozen copy"):
        MODELS.build({**block, "freeze_backbone": False})


def test_a_full_disk_during_export_is_one_line_and_leaves_no_directory(digits, tmp_path, capsys,
                                                                        monkeypatch):
    import errno
    from passl.deploy import export

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(export, "write_meta", disk_full)
    target = tmp_path / "export"
    code, _, err = run_tool(EXPORT, ["-c", digits["config"], "--load", digits["checkpoint"],
                                     "--output", str(target)], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: cannot write {target}: No space left on device (")
    assert "free on its file system" in err and len(err.strip().splitlines()) == 1
    assert not target.exists()
