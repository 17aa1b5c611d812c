"""uint8 crops normalised on the device, and the /dev/shm check at start."""
import os
import types

import numpy as np
import paddle
import pytest

from data_helpers import make_image_folder
from passl.data import device_input
from passl.data.loader import build_dataloader, set_loader_epoch
from passl.data.transforms import Normalize
from passl.errors import UserError

CROPS = {"name": "MultiCrop", "nmb_crops": [2, 1], "size_crops": [24, 12],
         "min_scale_crops": [0.3, 0.1], "max_scale_crops": [1.0, 0.3]}


def loader_over(folder, on_device, num_workers=0):
    crops = {**CROPS, "normalize_on_device": on_device}
    return build_dataloader({"dataset": {"name": "ImageFolder", "root": folder,
                                         "transforms": [crops]},
                             "sampler": {"batch_size": 4}, "loader": {"num_workers": num_workers}},
                            mode="train", seed=3)


def test_uint8_crops_normalised_on_the_device_equal_the_float_path(tmp_path):
    folder = make_image_folder(tmp_path / "train", per_class=3)
    float_loader, uint8_loader = loader_over(folder, False), loader_over(folder, True)
    normalize = device_input.batch_normalizer(uint8_loader)
    assert device_input.batch_normalizer(float_loader)("batch") == "batch"  # identity
    set_loader_epoch(float_loader, 0)
    set_loader_epoch(uint8_loader, 0)
    for (expected, labels), (shipped, same_labels) in zip(float_loader, uint8_loader):
        assert all(t.dtype == paddle.uint8 for t in shipped)
        got, got_labels = normalize((shipped, same_labels))
        assert got_labels is same_labels
        for want, have in zip(expected, got):
            assert have.dtype == paddle.float32 and have.shape == want.shape
            np.testing.assert_array_equal(have.numpy(), want.numpy())  # same float32 ops
        np.testing.assert_array_equal(labels.numpy(), same_labels.numpy())


def test_device_normalize_is_the_host_formula():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    host = Normalize(to_chw=True)(pixels)
    shipped = Normalize(on_device=True)
    chw = shipped(pixels)
    assert chw.dtype == np.uint8 and chw.shape == (3, 16, 16)
    device = shipped.device_normalize()(paddle.to_tensor(chw[None]))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.228, 0.224, 0.225])
    reference = (np.arange(256).reshape(1, 16, 16) / 255.0 - mean[:, None, None]) \
        / std[:, None, None]
    np.testing.assert_allclose(device.numpy()[0], host, rtol=0, atol=2e-6)
    np.testing.assert_allclose(device.numpy()[0], reference, rtol=0, atol=5e-6)
    assert Normalize().device_normalize() is None


def fake_loader(sample, batch_size=128, num_workers=10, prefetch_factor=2, shared=True):
    return types.SimpleNamespace(dataset=[(sample, 0)], num_workers=num_workers,
                                 use_shared_memory=shared, prefetch_factor=prefetch_factor,
                                 batch_sampler=types.SimpleNamespace(batch_size=batch_size))


def imagenet_crops(dtype):
    return [np.zeros((3, 224, 224), dtype)] * 2 + [np.zeros((3, 96, 96), dtype)] * 6


class Logs:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(("info", message))

    def warning(self, message):
        self.lines.append(("warning", message))


def fake_shm(monkeypatch, total_mb, free_mb):
    stat = types.SimpleNamespace(f_frsize=2 ** 20, f_blocks=total_mb, f_bavail=free_mb)
    monkeypatch.setattr(os, "statvfs", lambda path: stat)
    monkeypatch.setattr(os.path, "isdir", lambda path: True)


def test_shared_memory_need_is_batch_times_sample_times_in_flight_batches():
    per_image = 2 * 3 * 224 * 224 + 6 * 3 * 96 * 96       # uint8 bytes of 2x224 + 6x96 crops
    need, how = device_input.shared_memory_need(fake_loader(imagenet_crops(np.uint8)), 8)
    assert need == per_image * 128 * 10 * 2 * 8
    float_need, _ = device_input.shared_memory_need(fake_loader(imagenet_crops(np.float32)), 8)
    assert float_need == 4 * need
    assert how == "batch 128 x 0.45 MB per sample x 10 workers x prefetch 2 x 8 process(es)"
    assert device_input.shared_memory_need(fake_loader(imagenet_crops(np.uint8), shared=False),
                                           8)[0] == 0


def test_a_64_mb_dev_shm_is_one_error_with_the_fix(monkeypatch):
    fake_shm(monkeypatch, total_mb=64, free_mb=64)
    with pytest.raises(UserError) as error:
        device_input.check_shared_memory(fake_loader(imagenet_crops(np.uint8)), 8, Logs())
    assert str(error.value) == (
        "/dev/shm holds 64 MB but the train loader needs about 8.9 GB (batch 128 x 0.45 MB per "
        "sample x 10 workers x prefetch 2 x 8 process(es)); enlarge it (docker run "
        "--shm-size=12g, or mount -o remount,size=... /dev/shm), or lower "
        "dataloader.train.loader.num_workers/prefetch_factor, or set "
        "dataloader.train.loader.use_shared_memory=false")


def test_enough_dev_shm_logs_the_need_and_short_free_space_warns(monkeypatch):
    logs = Logs()
    fake_shm(monkeypatch, total_mb=32 * 1024, free_mb=16 * 1024)
    device_input.check_shared_memory(fake_loader(imagenet_crops(np.uint8)), 8, logs)
    fake_shm(monkeypatch, total_mb=32 * 1024, free_mb=1024)
    device_input.check_shared_memory(fake_loader(imagenet_crops(np.uint8)), 8, logs)
    assert [kind for kind, _ in logs.lines] == ["info", "warning"]
    assert logs.lines[0][1].startswith("/dev/shm: the train loader needs about 8.9 GB")
    assert logs.lines[1][1].startswith("/dev/shm has 1.0 GB free of 32.0 GB")
