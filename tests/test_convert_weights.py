"""tools/convert_weights.py: PyTorch SwAV files -> our models, output for output as in PyTorch.

The fixtures (tests/fixtures/make_torch_fixtures.py, torch 2.13) are a small SwAV in the
published key layout, saved in both formats, an eval_linear checkpoint for it and PyTorch's
own outputs on fixed images; none of this needs torch. The last tests, marked slow, build a
full ResNet-50 / RN50-w2 SwAV in PyTorch and run only where torch is installed.
"""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml

from passl.cli import run_cli
from passl.config import load_config
from passl.io.weights import load_pretrained
from passl.models import MODELS
from passl.models.architectures.swav import swav_from_torch
from passl.models.torch_weights import expected_shapes, map_torch_state
from test_cli import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_weights.py")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TINY_RESNET = {"name": "ResNet", "depth": 50, "layers": [1, 1, 1, 1], "base_width": 1,
               "stem": "imagenet"}
TINY_SWAV = {"name": "SwAV", "backbone": TINY_RESNET,
             "neck": {"name": "SwAVNeck", "in_dim": 32, "hidden_dim": 16, "out_dim": 8},
             "head": {"name": "SwAVPrototypes", "in_dim": 8, "num_prototypes": 10},
             "loss": {"name": "SwAVLoss", "nmb_crops": [2], "crops_for_assign": [0, 1]}}
TINY_CLASSIFIER = {"name": "Classification", "backbone": TINY_RESNET, "num_classes": 10}
TOLERANCE = 1e-5


def fixture(name):
    return os.path.join(FIXTURES, name)


def write_config(directory, model, name="tiny.yaml", base=None):
    path = str(directory / name)
    with open(path, "w") as f:
        yaml.safe_dump({**({"_base_": base} if base else {}), "model": model}, f)
    return path


spec = importlib.util.spec_from_file_location("convert_weights_tool", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def run_tool(*args):
    """The tool's exit code, stdout and stderr, run in this process (as from ROOT)."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                pytest.raises(SystemExit) as exit_:
            run_cli(tool.main, list(args))
    finally:
        os.chdir(cwd)
    return exit_.value.code, out.getvalue(), err.getvalue()


def convert(tmp_path, sources, model, config_model, name):
    output = str(tmp_path / f"{name}.pdparams")
    code, out, err = run_tool(*sources, "--model", model, "--output", output,
                              "-c", write_config(tmp_path, config_model, f"{name}.yaml"))
    assert code == 0, err
    return output, out


@pytest.fixture(scope="module")
def torch_outputs():
    return np.load(fixture("torch_outputs.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny SwAV converted from each format, and the classifier from pretrain + linear."""
    tmp = tmp_path_factory.mktemp("converted")
    files = {fmt: convert(tmp, [fixture(f"swav_tiny_{fmt}.pth")], "swav", TINY_SWAV, fmt)
             for fmt in ("legacy", "zip")}
    files["classifier"] = convert(tmp, [fixture("swav_tiny_legacy.pth"),
                                        fixture("linear_tiny_legacy.pth")],
                                  "classifier", TINY_CLASSIFIER, "classifier")
    files["backbone"] = convert(tmp, [fixture("swav_tiny_zip.pth")], "backbone", TINY_CLASSIFIER,
                                "backbone")
    return files


def built(model_cfg, path):
    model = MODELS.build(model_cfg)
    model.set_state_dict(paddle.load(path))
    model.eval()
    return model


def test_legacy_and_zip_files_convert_to_the_same_pdparams(converted):
    legacy, zipped = paddle.load(converted["legacy"][0]), paddle.load(converted["zip"][0])
    assert list(legacy) == list(zipped) == list(MODELS.build(TINY_SWAV).state_dict())
    for name in legacy:
        assert np.array_equal(legacy[name].numpy(), zipped[name].numpy()), name


def test_report_lists_mapping_and_left_out(converted):
    out = converted["legacy"][1]
    assert out.startswith("mapped 94 tensors (3,509 values), checked against ")
    assert "  85 ResNet trunk tensors under the same names" in out
    assert "  projection_head.1.running_var -> neck.mlp.1._variance\n" in out
    assert ("  prototypes.weight -> head.heads.0.weight (transposed [out, in] -> [in, out])\n"
            in out)
    assert "left out 18, num_batches_tracked (BatchNorm update counters" in out
    classifier = converted["classifier"][1]
    assert "  linear.weight -> fc.weight (transposed [out, in] -> [in, out])" in classifier
    assert ("left out 9, not part of --model classifier: projection_head.0.weight, "
            "projection_head.0.bias, projection_head.1.weight, ...") in classifier


def test_swav_outputs_match_pytorch(converted, torch_outputs):
    images = paddle.to_tensor(torch_outputs["images"])
    for fmt in ("legacy", "zip"):
        model = built(TINY_SWAV, converted[fmt][0])
        features = model.backbone(images)
        embeddings = model.neck(features)
        scores = model.head(embeddings)[0]
        for ours, name in ((features, "features"), (embeddings, "embeddings"),
                           (scores, "scores")):
            assert np.abs(ours.numpy() - torch_outputs[name]).max() <= TOLERANCE, (fmt, name)
    assert np.abs(torch_outputs["scores"]).max() > 0.1  # not trivially close


def test_classifier_logits_match_pytorch(converted, torch_outputs):
    model = built(TINY_CLASSIFIER, converted["classifier"][0])
    logits = model.fc(model.backbone(paddle.to_tensor(torch_outputs["images"])))
    assert np.abs(logits.numpy() - torch_outputs["logits"]).max() <= TOLERANCE


def test_backbone_file_loads_with_pretrained(converted, torch_outputs):
    model = MODELS.build(TINY_CLASSIFIER)
    report = load_pretrained(model.backbone, converted["backbone"][0])
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert not any(name.startswith("backbone.") for name in paddle.load(converted["backbone"][0]))
    model.eval()
    features = model.backbone(paddle.to_tensor(torch_outputs["images"])).numpy()
    assert np.abs(features - torch_outputs["features"]).max() <= TOLERANCE


@pytest.mark.parametrize("arch, widen, config", [
    ("resnet50", 1, "swav_r50_100ep.yaml"), ("resnet50w2", 2, "swav_r50w2_400ep.yaml"),
    ("resnet50w4", 4, "swav_r50w4_400ep.yaml"), ("resnet50w5", 5, "swav_r50w5_400ep.yaml")])
def test_wide_configs_lay_out_every_tensor_as_the_reference(arch, widen, config):
    """Every tensor of the reference's resnet50/w2/w4/w5 (key and shape, from its own
    src/resnet50.py: tests/fixtures/reference_layouts.json) has its place in our model:
    the same shape, or the transposed one for a Linear weight (the only 2-D tensors)."""
    with open(fixture("reference_layouts.json")) as f:
        reference = json.load(f)[arch]
    paddle_layout = {swav_from_torch(name): shape[::-1] if len(shape) == 2 else shape
                     for name, shape in reference if not name.endswith(".num_batches_tracked")}
    cfg = load_config(os.path.join(ROOT, "configs", "swav", config))
    shapes = expected_shapes(cfg.model, "swav")
    assert paddle_layout == dict(shapes)
    assert shapes["backbone.conv1.weight"] == [64 * widen, 3, 7, 7]
    assert shapes["backbone.layer4.2.conv3.weight"] == [2048 * widen, 512 * widen, 1, 1]
    backbone_values = sum(np.prod(s) for n, s in shapes.items() if n.startswith("backbone.")
                          and not n.endswith(("_mean", "_variance")))
    # the swav README's parameter counts: RN50-w2 94M, w4 375M, w5 586M
    assert round(backbone_values / 1e6) == {1: 24, 2: 94, 4: 375, 5: 586}[widen]


def test_multi_head_prototypes_and_single_linear_head_map():
    assert swav_from_torch("prototypes.prototypes1.weight") == "head.heads.1.weight"
    assert swav_from_torch("projection_head.weight") == "neck.mlp.weight"
    state = {"prototypes.prototypes0.weight": np.ones((3, 2), np.float32),
             "prototypes.prototypes1.weight": np.arange(8, dtype=np.float64).reshape(4, 2)}
    ours, _, _ = map_torch_state(state, "swav")
    assert ours["head.heads.1.weight"].dtype == np.float32
    assert ours["head.heads.1.weight"].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_torchvision_style_resnet_converts(tmp_path, torch_outputs):
    """A plain trunk state dict (no head, no 'module.'), with torchvision's own fc classifier."""
    from passl.models.torch_weights import convert_torch_weights, read_torch_states
    swav = read_torch_states([fixture("swav_tiny_zip.pth")])
    trunk = {n: a for n, a in swav.items() if not n.startswith(("projection_head", "prototypes"))}
    rng = np.random.default_rng(0)
    trunk["fc.weight"] = rng.normal(size=(10, 32)).astype(np.float32)
    trunk["fc.bias"] = rng.normal(size=10).astype(np.float32)
    model_cfg = load_config(write_config(tmp_path, TINY_CLASSIFIER)).model
    backbone, _, left_out = convert_torch_weights(trunk, "backbone", model_cfg, "tiny")
    assert left_out["not part of --model backbone"] == ["fc.weight", "fc.bias"]
    state, _, _ = convert_torch_weights(trunk, "classifier", model_cfg, "tiny")
    model = MODELS.build(TINY_CLASSIFIER)
    model.set_state_dict(state)
    model.eval()
    images = paddle.to_tensor(torch_outputs["images"])
    features = model.backbone(images).numpy()
    assert np.abs(features - torch_outputs["features"]).max() <= TOLERANCE
    logits = features @ trunk["fc.weight"].T + trunk["fc.bias"]
    assert np.abs(model.fc(model.backbone(images)).numpy() - logits).max() <= TOLERANCE
    assert list(backbone) == [n[len("backbone."):] for n in state if n.startswith("backbone.")]


# ---------------------------------------------------------------- errors: one line, nothing written

@pytest.mark.parametrize("case", ["not_checkpoint", "truncated", "fits_nothing", "wrong_width",
                                  "mis_shaped", "classifier_without_linear"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    source, model, config_model = fixture("swav_tiny_legacy.pth"), "swav", TINY_SWAV
    if case == "not_checkpoint":
        source = write_config(tmp_path, TINY_SWAV, "weights.pth")
        expected = "SOURCE: not a PyTorch checkpoint (neither a zip archive nor a pickle stream)"
    elif case == "truncated":
        source = str(tmp_path / "cut.pth")
        with open(fixture("swav_tiny_zip.pth"), "rb") as f:
            open(source, "wb").write(f.read()[:20000])
        expected = "SOURCE: truncated or not a PyTorch checkpoint (BadZipFile); download it again"
    elif case == "fits_nothing":
        source = fixture("tensor_kinds_zip.pth")
        expected = ("SOURCE: 6 tensors fit no layer of a ResNet, SwAV or linear classifier: half, "
                    "double, long, ...")
    elif case == "wrong_width":
        config_model = {**TINY_SWAV, "backbone": {**TINY_RESNET, "width_multiplier": 2}}
        expected = ("SOURCE: the file's ResNet has 1 channels in conv1, CONFIG builds 2 "
                    "(width_multiplier 2); the file fits width_multiplier 1: pass a config "
                    "with model.backbone.width_multiplier: 1 (-c, or -o)")
    elif case == "mis_shaped":
        config_model = {**TINY_SWAV, "neck": {**TINY_SWAV["neck"], "hidden_dim": 12}}
        expected = ("SOURCE: 7 tensors have another shape than in the model of CONFIG (Paddle "
                    "layout): projection_head.0.weight [32, 16] -> neck.mlp.0.weight [32, 12], "
                    "projection_head.0.bias [16] -> neck.mlp.0.bias [12], ")
    else:
        model, config_model = "classifier", TINY_CLASSIFIER
        expected = ("SOURCE: 2 tensors of the model of CONFIG are not in the file: fc.weight, "
                    "fc.bias; "
                    "a classifier needs the trunk and its eval_linear classifier")
    config = write_config(tmp_path, config_model)
    output = tmp_path / "out" / "w.pdparams"
    code, out, err = run_tool(source, "--model", model, "--output", str(output), "-c", config)
    assert code == 2
    assert_one_line_error(code, err, "error: " + expected.replace("CONFIG", config).replace(
        "SOURCE", source))
    assert out == "" and not output.exists() and not output.parent.exists()


def test_default_config_follows_the_file_width(tmp_path):
    """Without -c, a width-1 file is checked against the RN50 config (and here does not fit)."""
    source = fixture("swav_tiny_legacy.pth")
    code, _, err = run_tool(source, "--output", str(tmp_path / "w.pdparams"))
    assert code == 2
    assert_one_line_error(code, err, f"error: {source}: the file's ResNet has 1 channels in "
                                     "conv1, configs/swav/swav_clas_r50.yaml builds 64 "
                                     "(width_multiplier 1); pass the config the file was "
                                     "trained with (-c)")
    configs = os.path.join(ROOT, "configs", "swav")
    for target, width, config in (("swav", 2.0, "swav_r50w2_400ep.yaml"),
                                  ("backbone", 5.0, "swav_clas_r50w5.yaml"),
                                  ("classifier", 4.0, "swav_clas_r50w4.yaml"),
                                  ("backbone", 3.0, "swav_clas_r50.yaml"),
                                  ("swav", None, "swav_r50_100ep.yaml")):
        assert os.path.abspath(tool.default_config(target, width)) == os.path.join(configs, config)


def test_command_line_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, fixture("torch_outputs.npz"), "--output",
                           str(tmp_path / "w.pdparams")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert_one_line_error(proc.returncode, proc.stderr, "torch_outputs.npz: a zip file but not "
                                                        "a PyTorch checkpoint (no data.pkl)")
    assert proc.returncode == 2 and not (tmp_path / "w.pdparams").exists()


def test_a_name_in_two_files_is_refused(tmp_path):
    code, _, err = run_tool(fixture("swav_tiny_legacy.pth"), fixture("swav_tiny_zip.pth"),
                            "--output", str(tmp_path / "w.pdparams"))
    assert code == 2
    assert_one_line_error(code, err, "error: conv1.weight is in both ")


def test_evaluate_only_on_a_converted_classifier(tmp_path, converted):
    """tools/train.py --load CONVERTED --evaluate-only prints and records top-1/top-5 equal to
    the converted model's own accuracy on the Digits val set."""
    config = write_config(tmp_path, TINY_CLASSIFIER, "clas.yaml",
                          base=os.path.join(ROOT, "configs", "swav", "swav_clas_r18_digits.yaml"))
    output_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", config,
         "-o", f"output_dir={output_dir}", "-o", "device=cpu", "--load", converted["classifier"][0],
         "--evaluate-only"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
    evaluation = [r for r in records if "top1" in r][-1]
    assert "top1" in proc.stdout + proc.stderr and "top5" in proc.stdout + proc.stderr

    cfg = load_config(config, [f"output_dir={output_dir}"])
    from passl.data import DATASETS
    dataset = DATASETS.build(cfg.dataloader.val.dataset)
    model = built(TINY_CLASSIFIER, converted["classifier"][0])
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    labels = np.array([int(dataset[i][1]) for i in range(len(dataset))])
    logits = model.fc(model.backbone(paddle.to_tensor(images))).numpy()
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert evaluation["top1"] == pytest.approx(100 * np.mean(top5[:, 0] == labels), abs=1e-6)
    assert evaluation["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)),
                                               abs=1e-6)


# ---------------------------------------------------------------- full size, with torch installed

@pytest.mark.slow
@pytest.mark.parametrize("widen, config", [(1, "swav_r50_100ep.yaml"),
                                           (2, "swav_r50w2_400ep.yaml")])
def test_full_size_reference_model_converts_exactly(tmp_path, widen, config):
    """A ResNet-50 (and RN50-w2) SwAV with random weights in the reference's exact layout,
    saved by torch in the legacy format, converts and gives PyTorch's outputs (1e-4 relative)."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: full-size check skipped")
    from torch_swav_reference import ReferenceSwAV, published_state_dict, randomise
    from passl.models.torch_weights import convert_torch_weights, read_torch_states

    hidden = {1: 2048, 2: 8192}[widen]
    reference = randomise(ReferenceSwAV(widen=widen, hidden_mlp=hidden), seed=widen)
    path = str(tmp_path / "swav.pth.tar")
    torch.save(published_state_dict(reference), path, _use_new_zipfile_serialization=False)
    images = np.random.default_rng(0).normal(size=(2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in (*reference(torch.from_numpy(images))[:2],
                                        reference(torch.from_numpy(images))[2][0])]
    del reference

    cfg = load_config(os.path.join(ROOT, "configs", "swav", config))
    state, _, _ = convert_torch_weights(read_torch_states([path]), "swav", cfg.model, config)
    model = MODELS.build(cfg.model)
    model.set_state_dict(state)
    model.eval()
    features = model.backbone(paddle.to_tensor(images))
    embeddings = model.neck(features)
    outputs = [features, embeddings, model.head(embeddings)[0]]
    for ours, theirs, name in zip(outputs, expected, ("features", "embeddings", "scores")):
        relative = np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max()
        print(f"w{widen} {name}: max relative difference {relative:.2e}")
        assert relative <= 1e-4, name


TINY_DEEPCLUSTERV2 = {**TINY_SWAV, "name": "DeepClusterV2",
                      "head": {"name": "SwAVPrototypes", "in_dim": 8,
                               "num_prototypes": [10, 7, 9]},
                      "loss": {"name": "DeepClusterV2Loss", "nmb_crops": [2]}}


def test_deepclusterv2_file_converts_with_its_three_heads(tmp_path):
    """The published DeepCluster-v2 layout (tests/fixtures/make_deepclusterv2_fixture.py)."""
    path, out = convert(tmp_path, [fixture("deepclusterv2_tiny_legacy.pth")], "deepclusterv2",
                        TINY_DEEPCLUSTERV2, "dcv2")
    assert "  prototypes.prototypes2.weight -> head.heads.2.weight (transposed" in out
    expected = np.load(fixture("deepclusterv2_tiny_outputs.npz"))
    model = built(TINY_DEEPCLUSTERV2, path)
    features = model.backbone(paddle.to_tensor(expected["images"]))
    embeddings = model.neck(features)
    for ours, theirs in ((features, expected["features"]), (embeddings, expected["embeddings"])):
        assert np.abs(ours.numpy() - theirs).max() <= TOLERANCE
    for h, scores in enumerate(model.head(embeddings)):
        assert np.abs(scores.numpy() - expected[f"scores{h}"]).max() <= TOLERANCE, h
    assert tool.default_config("deepclusterv2", 1).endswith(
        os.path.join("configs", "deepclusterv2", "deepclusterv2_r50_800ep.yaml"))
