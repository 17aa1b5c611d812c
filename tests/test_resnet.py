"""ResNet backbone: paddle.vision weight compatibility, stems, widths and initialisation."""
import numpy as np
import paddle
import pytest
from paddle.vision.models import resnet18, resnet50

from passl.errors import ConfigError
from passl.models.backbones.resnet import ResNet
from passl.models.registry import BACKBONES


@pytest.mark.parametrize("depth, reference", [(50, resnet50), (18, resnet18)])
def test_paddle_vision_weights_load_by_name_and_give_the_same_features(depth, reference):
    paddle.seed(1)
    theirs = reference(num_classes=0)  # no fc layer
    ours = ResNet(depth=depth)
    missing, unexpected = ours.set_state_dict(theirs.state_dict())
    assert missing == [] and unexpected == []
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = paddle.rand([2, 3, 64, 64])
    np.testing.assert_array_equal(ours(x).numpy(), theirs(x).flatten(1).numpy())


@pytest.mark.parametrize("config, channels", [
    ({"depth": 18}, 512),
    ({"depth": 34, "layers": [1, 1, 1, 1]}, 512),
    ({"depth": 50, "layers": [1, 1, 1, 1]}, 2048),
    ({"depth": 50, "layers": [1, 1, 1, 1], "width_multiplier": 2}, 4096),
    ({"depth": 18, "layers": [1, 1, 1, 1], "base_width": 16, "stem": "small"}, 128),
])
def test_out_channels(config, channels):
    model = BACKBONES.build({"name": "ResNet", **config})
    assert model.out_channels == channels
    assert model(paddle.rand([2, 3, 32, 32])).shape == [2, channels]


@pytest.mark.parametrize("stem, size, map_size", [("imagenet", 224, 7), ("cifar", 32, 4),
                                                  ("small", 32, 2)])
def test_stems_set_the_feature_map_resolution(stem, size, map_size):
    model = ResNet(depth=18, layers=[1, 1, 1, 1], base_width=8, stem=stem)
    assert (model.maxpool is not None) == (stem == "imagenet")
    assert model.feature_map(paddle.rand([1, 3, size, size])).shape == [1, 64, map_size, map_size]


def test_channels_last_matches_channels_first():
    paddle.seed(0)
    first = ResNet(depth=18, layers=[1, 1, 1, 1], base_width=8, stem="cifar")
    last = ResNet(depth=18, layers=[1, 1, 1, 1], base_width=8, stem="cifar", data_format="NHWC")
    last.set_state_dict(first.state_dict())
    first.eval(), last.eval()
    x = paddle.rand([2, 3, 16, 16])
    np.testing.assert_allclose(last(x).numpy(), first(x).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last.feature_map(x).numpy(), first.feature_map(x).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_initialisation_follows_the_reference():
    paddle.seed(0)
    model = ResNet(depth=50, layers=[1, 1, 1, 1], zero_init_residual=True)
    conv = model.layer4[0].conv2.weight  # [512, 512, 3, 3]; fan_out = 512 * 9
    assert abs(conv.numpy().std() / np.sqrt(2.0 / (512 * 9)) - 1) < 0.02
    assert (model.layer1[0].bn1.weight.numpy() == 1).all()
    assert (model.layer1[0].bn1.bias.numpy() == 0).all()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        assert (stage[0].bn3.weight.numpy() == 0).all()
    assert (ResNet(depth=18, layers=[1, 1, 1, 1]).layer1[0].bn2.weight.numpy() == 1).all()
    assert (ResNet(depth=18, layers=[1, 1, 1, 1], zero_init_residual=True)
            .layer1[0].bn2.weight.numpy() == 0).all()


@pytest.mark.parametrize("config, message", [
    ({"depth": 20}, "depth 20 is not supported"),
    ({"stem": "tiny"}, "stem 'tiny' is not supported"),
    ({"layers": [1, 1, 1]}, "4 positive block counts"),
])
def test_bad_settings_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        ResNet(**config)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_pool_size_keeps_a_grid_of_averages(data_format):
    paddle.seed(0)
    model = ResNet(depth=18, layers=[1, 1, 1, 1], base_width=8, stem="cifar", pool_size=2,
                   data_format=data_format)
    model.eval()
    x = paddle.rand([2, 3, 32, 32])
    fmap = model.feature_map(x).numpy()                       # [2, 64, 4, 4]
    expected = fmap.reshape(2, 64, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(2, -1)
    assert model.out_channels == 64 * 4
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-6)
