"""Batches with each image's dataset index (``with_indices``, for DeepCluster-v2): every
dataset kind, subsets, every training sampler, two simulated ranks, with and without
workers; the default batches stay ``(inputs, labels)``."""
import os
import subprocess
import sys

import numpy as np
import pytest

from passl.data import DATASETS, build_dataloader
from passl.data.loader import PasslDataLoader, ResumableBatchSampler, WithIndices, collate_batch
from passl.data.shards import ShardBatchSampler
from tiny_image_folder import NORMALIZE, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("indices")
    write_image_folder(tmp / "images", per_class=(10, 1))
    files = sorted(p.relative_to(tmp / "images") for p in (tmp / "images" / "train").rglob("*.png"))
    (tmp / "list.txt").write_text("".join(f"{f} {i % 3}\n" for i, f in enumerate(files)))
    made = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"),
                           str(tmp / "images"), "--list", str(tmp / "list.txt"),
                           "--output", str(tmp / "shards"), "--shard-size", "7"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    return tmp


def dataset_blocks(tmp):
    images = str(tmp / "images")
    return {
        "ImageFolder": {"name": "ImageFolder", "root": images + "/train"},
        "ImageList": {"name": "ImageList", "root": images, "list_file": str(tmp / "list.txt")},
        "subset": {"name": "ImageFolder", "root": images + "/train",
                   "subset": {"per_class": 6, "seed": 1}},
        "TarShards": {"name": "TarShards", "root": str(tmp / "shards"), "shuffle_window": 4},
        "Digits": {"name": "Digits", "split": "val", "image_size": 8,
                   "cache_dir": str(tmp / "digits")},
    }


def samplers(dataset, rank, world_size):
    if hasattr(dataset, "batch_sampler"):
        return ShardBatchSampler(dataset, 4, rank=rank, world_size=world_size)
    return ResumableBatchSampler(dataset, batch_size=4, num_replicas=world_size, rank=rank,
                                 shuffle=True, drop_last=True)


@pytest.mark.parametrize("kind, world_size, workers", [
    *[(kind, world, 0) for kind in ("ImageFolder", "ImageList", "subset", "TarShards", "Digits")
      for world in (1, 2)],
    ("ImageFolder", 2, 1), ("TarShards", 2, 1)])  # a worker process builds the batches
def test_each_batch_carries_the_indices_its_sampler_chose(data, kind, world_size, workers):
    dataset = DATASETS.build({**dataset_blocks(data)[kind], "transforms": [NORMALIZE],
                              "seed": 3})
    dataset.set_epoch(2)
    seen = []
    for rank in range(world_size):
        sampler = samplers(dataset, rank, world_size)
        sampler.set_epoch(2)
        loader = PasslDataLoader(WithIndices(dataset), batch_sampler=sampler,
                                 collate_fn=collate_batch, num_workers=workers)
        expected_batches = list(sampler)
        sampler.set_epoch(2)  # Paddle's sampler moves to the next epoch after each pass
        batches = list(loader)
        assert len(batches) == len(expected_batches) > 0
        for (images, labels, indices), expected in zip(batches, expected_batches):
            indices = indices.numpy()
            assert indices.dtype == np.int64
            np.testing.assert_array_equal(indices, expected)
            np.testing.assert_array_equal(labels.numpy(), dataset.labels[indices])
            np.testing.assert_array_equal(images.numpy(),
                                          np.stack([dataset[i][0] for i in indices]))
        seen.extend(i for batch in expected_batches for i in batch)
    assert set(seen) <= set(range(len(dataset)))
    assert len(set(seen)) >= len(dataset) - world_size * 4  # drop_last leaves < a batch/rank


def test_indices_come_only_when_asked_for(data):
    block = {"dataset": {**dataset_blocks(data)["ImageFolder"], "transforms": [NORMALIZE]},
             "sampler": {"batch_size": 4}}
    plain = next(iter(build_dataloader(block)))
    indexed_loader = build_dataloader(block, with_indices=True)
    indexed = next(iter(indexed_loader))
    assert len(plain) == 2 and len(indexed) == 3
    np.testing.assert_array_equal(indexed[0].numpy(), plain[0].numpy())
    assert len(indexed_loader.dataset) == 30 and indexed_loader.dataset.transform is not None
