"""load_pretrained: an exact fit loads; anything else is listed and refused unless relaxed."""
import numpy as np
import paddle
import pytest

from passl.errors import UserError
from passl.io.weights import load_pretrained
from passl.models import BACKBONES

TINY_RESNET = {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 8,
               "stem": "small"}


def backbone(seed, **changes):
    paddle.seed(seed)
    return BACKBONES.build({**TINY_RESNET, **changes})


def save(tmp_path, state, name="w.pdparams"):
    path = str(tmp_path / name)
    paddle.save(state, path)
    return path


def same(a, b):
    return all(np.array_equal(v.numpy(), b.state_dict()[k].numpy()) for k, v in a.state_dict().items())


def test_exact_fit_loads_every_tensor(tmp_path):
    source, target = backbone(1), backbone(2)
    source.bn1._mean.set_value(paddle.full_like(source.bn1._mean, 0.5))  # buffers travel too
    assert not same(source, target)
    report = load_pretrained(target, save(tmp_path, source.state_dict()))
    assert same(source, target)
    assert len(report["loaded"]) == len(target.state_dict())
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []


def test_names_with_backbone_prefix_load(tmp_path):
    source, target = backbone(1), backbone(2)
    prefixed = {"backbone." + k: v for k, v in source.state_dict().items()}
    load_pretrained(target, save(tmp_path, prefixed))
    assert same(source, target)


def test_mismatches_are_listed_and_refused(tmp_path):
    state = backbone(1).state_dict()
    del state["conv1.weight"]
    state["fc.weight"] = paddle.zeros([4, 4])
    state["bn1.weight"] = paddle.ones([3])
    path = save(tmp_path, state)
    target = backbone(2)
    before = {k: v.numpy().copy() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as error:
        load_pretrained(target, path)
    message = str(error.value)
    assert "\n" not in message
    for fragment in ("1 missing (conv1.weight)", "1 unexpected (fc.weight)",
                     "1 mismatched (bn1.weight [3] vs [8])", path):
        assert fragment in message, message
    assert all(np.array_equal(before[k], v.numpy()) for k, v in target.state_dict().items())

    report = load_pretrained(target, path, strict=False)  # relaxed: the rest loads
    assert report["missing"] == ["conv1.weight"] and len(report["mismatched"]) == 1
    assert np.array_equal(target.layer1[0].conv1.weight.numpy(), state["layer1.0.conv1.weight"].numpy())


def test_a_different_architecture_lists_first_names_only(tmp_path):
    path = save(tmp_path, backbone(1, depth=50).state_dict())
    with pytest.raises(UserError, match=r"\d+ unexpected \([^)]*, \.\.\.\)"):
        load_pretrained(backbone(2), path)


def test_wrong_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_pretrained(backbone(0), str(tmp_path / "absent.pdparams"))
    checkpoint = save(tmp_path, {"model": backbone(0).state_dict(), "epoch": 3}, "epoch_3.pd")
    with pytest.raises(UserError, match="training checkpoint.*extract_weight.py"):
        load_pretrained(backbone(0), checkpoint)
    text = tmp_path / "notes.pdparams"
    text.write_text("not weights")
    with pytest.raises(UserError, match="not a file written by paddle.save"):
        load_pretrained(backbone(0), str(text))
