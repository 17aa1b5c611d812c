"""tools/make_shards.py and the TarShards dataset: format, epoch order, offsets, errors."""
import collections
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import paddle
import pytest

from passl.config import load_config
from passl.data import DATASETS
from passl.data.image_io import decode_image
from passl.data.shards import ShardBatchSampler, epoch_order
from passl.data.transforms import build_pipeline
from passl.engine.trainer import Trainer
from passl.io.metrics_log import read_metrics
from passl.io.tar_shards import ShardError
from test_multiprocess_train import CLI, tiny_swav_config
from tiny_image_folder import write_image_folder
from toy_training import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = 48


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 PNGs listed with their own label each (the label names the image), in shards of 10."""
    tmp = tmp_path_factory.mktemp("shards")
    write_image_folder(tmp / "images", per_class=(16, 1))
    files = sorted(p.relative_to(tmp / "images") for p in (tmp / "images" / "train").rglob("*.png"))
    (tmp / "list.txt").write_text("".join(f"{f} {i}\n" for i, f in enumerate(files)))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"),
                             str(tmp / "images"), "--list", str(tmp / "list.txt"),
                             "--output", str(tmp / "shards"), "--shard-size", "10"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("48 images in 5 shard(s) of up to 10, ")
    return tmp, files


def test_shards_are_webdataset_tars_holding_every_image_once(shards):
    tmp, files = shards
    names = sorted(os.listdir(tmp / "shards"))
    assert names == ["index.npz"] + [f"shard-00000{i}.tar" for i in range(5)]
    found, counts = {}, []
    for name in names[1:]:
        with tarfile.open(tmp / "shards" / name) as tar:
            members = tar.getmembers()
            counts.append(len(members) // 2)
            for image, label in zip(members[::2], members[1::2]):
                key = image.name[:-len(".png")]
                assert image.name.endswith(".png") and label.name == f"{key}.cls"
                found[key] = (tar.extractfile(image).read(), int(tar.extractfile(label).read()))
    assert counts == [10, 10, 10, 10, 8]
    assert sorted(found) == [f"{i:010d}" for i in range(IMAGES)]
    source = {i: (open(tmp / "images" / f, "rb").read(), i) for i, f in enumerate(files)}
    assert sorted(found.values()) == sorted(source.values())
    dataset = DATASETS.build({"name": "TarShards", "root": str(tmp / "shards")})
    for number in (0, 17, 47):  # random access by the index gives the member's bytes
        data, label = found[f"{number:010d}"]
        assert dataset.reader.read(number) == data and dataset.labels[number] == label


def labels_read(dataset, sampler, workers):
    loader = paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    return [int(x) for _, labels in loader for x in labels.numpy()]


def test_each_image_once_per_epoch_over_two_ranks_and_two_workers(shards):
    tmp, _ = shards
    dataset = DATASETS.build({"name": "TarShards", "root": str(tmp / "shards"),
                              "shuffle_window": 8, "seed": 5})
    epochs = []
    for epoch in (0, 1):
        ranks = []
        for rank in (0, 1):
            sampler = ShardBatchSampler(dataset, 4, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            ranks.append(labels_read(dataset, sampler, workers=2))
            # the order is the sampler's, whatever the number of workers
            assert ranks[-1] == [int(dataset.labels[i]) for i in sampler.order()]
        assert sorted(ranks[0] + ranks[1]) == list(range(IMAGES))
        epochs.append(ranks)
    assert epochs[0] != epochs[1]
    again = epoch_order(dataset.shard_of, 5, 1, 1, 2, 8)  # a pure function
    assert [int(dataset.labels[i]) for i in again] == epochs[1][1]


def test_starting_at_an_offset_yields_exactly_the_remaining_images(shards):
    tmp, _ = shards
    dataset = DATASETS.build({"name": "TarShards", "root": str(tmp / "shards")})
    seen = []
    for rank in (0, 1):
        whole = ShardBatchSampler(dataset, 4, rank=rank, world_size=2)
        whole.set_epoch(3)
        full = [i for batch in whole for i in batch]
        resumed = ShardBatchSampler(dataset, 4, rank=rank, world_size=2)
        resumed.start_epoch_at(3, 8)  # two steps of 4 done before the interruption
        rest = [batch for batch in resumed]
        assert len(resumed) == len(rest) == 4
        assert [i for batch in rest for i in batch] == full[8:]
        seen += full[:8] + [i for batch in rest for i in batch]
    assert sorted(seen) == list(range(IMAGES))


def test_padding_repeats_the_first_images_of_the_order_when_ranks_do_not_divide(shards):
    tmp, _ = shards
    dataset = DATASETS.build({"name": "TarShards", "root": str(tmp / "shards")})
    shares = [epoch_order(dataset.shard_of, 0, 0, rank, 5, 2048) for rank in range(5)]
    assert [len(s) for s in shares] == [10] * 5
    counts = collections.Counter(int(i) for s in shares for i in s)
    assert sorted(counts) == list(range(IMAGES))
    whole_order = epoch_order(dataset.shard_of, 0, 0, 0, 1, shuffle_window=1)  # one rank, unwindowed
    assert sorted(i for i, c in counts.items() if c == 2) == sorted(whole_order[:2].tolist())


def whole_order_then_cut(shard_of, seed, epoch, rank, world_size, shuffle_window, shuffle=True):
    """The module docstring's definition, computed the plain way: the whole epoch's order,
    padded cyclically, cut into shares, shuffled in windows."""
    count = len(shard_of)
    shards = np.unique(shard_of)
    if shuffle:
        shards = np.random.default_rng([seed, epoch]).permutation(len(shards))
    order = np.concatenate([
        np.flatnonzero(shard_of == s)[np.random.default_rng([seed, epoch, s]).permutation(
            np.count_nonzero(shard_of == s)) if shuffle else slice(None)] for s in shards])
    per_rank = -(-count // world_size)
    share = np.resize(order, per_rank * world_size)[rank * per_rank:(rank + 1) * per_rank]
    if shuffle and shuffle_window > 1:
        rng = np.random.default_rng([seed, epoch, rank, world_size])
        share = np.concatenate([rng.permutation(share[i:i + shuffle_window])
                                for i in range(0, per_rank, shuffle_window)])
    return share


@pytest.mark.parametrize("sizes", [[10, 10, 10, 10, 8], [7], [3, 1, 5, 2]])
def test_the_epoch_order_computed_per_share_is_the_definition(sizes):
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    for world_size in (1, 2, 3, 5, 13):
        for shuffle, window in ((True, 4), (True, 1), (False, 4)):
            for rank in range(world_size):
                np.testing.assert_array_equal(
                    epoch_order(shard_of, 9, 2, rank, world_size, window, shuffle),
                    whole_order_then_cut(shard_of, 9, 2, rank, world_size, window, shuffle),
                    err_msg=f"{sizes} world {world_size} rank {rank} shuffle {shuffle}")


def test_a_truncated_shard_is_one_line(shards, tmp_path):
    tmp, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(tmp / "shards", copy)
    dataset = DATASETS.build({"name": "TarShards", "root": str(copy)})
    shard = copy / "shard-000002.tar"
    size = os.path.getsize(shard)
    os.truncate(shard, 5000)
    number = int(np.flatnonzero(dataset.shard_of == 2)[-1])
    with pytest.raises(ShardError) as error:  # cut while the run reads it
        dataset[number]
    assert str(error.value).startswith(f"{shard}:{number:010d}: shard truncated (image ends "
                                       f"after ")
    with pytest.raises(ShardError) as error:  # cut before the run starts
        DATASETS.build({"name": "TarShards", "root": str(copy)})
    assert str(error.value) == (f"{shard}: shard truncated (5000 of {size} bytes); copy it again "
                                f"or re-create the shards with tools/make_shards.py")


def test_swav_trains_on_shards(shards, tmp_path):
    tmp, _ = shards
    cfg = tiny_swav_config(tmp / "images", tmp_path / "run")
    cfg["epochs"] = 1
    cfg["dataloader"]["train"]["dataset"] = {
        "name": "TarShards", "root": str(tmp / "shards"),
        "transforms": cfg["dataloader"]["train"]["dataset"]["transforms"]}
    trainer = Trainer(load_config(write_config(cfg, tmp_path / "c.yaml")))
    assert isinstance(trainer.train_loader.batch_sampler, ShardBatchSampler)
    trainer.train()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"), "train")
    assert len(records) == 12 and all(np.isfinite(r["loss"]) for r in records)


def test_make_shards_mistakes_are_one_line(shards, tmp_path):
    tmp, _ = shards
    tool = os.path.join(ROOT, "tools", "make_shards.py")
    cases = [([str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")],
              f"error: {tmp_path / 'nowhere'}: directory not found; give the ImageFolder root "
              f"(root/<class>/<image>), or with --list the root of its paths"),
             ([str(tmp / "images" / "train"), "--output", str(tmp / "shards")],
              f"error: --output {tmp / 'shards'}: already holds shards (index.npz); choose "
              f"another directory or delete it")]
    for args, message in cases:
        result = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True,
                                timeout=60)
        assert (result.returncode, result.stderr) == (2, message + "\n")


def test_augmentations_depend_on_seed_epoch_and_sample_number_only(shards):
    tmp, _ = shards
    crops = {"name": "MultiCrop", "nmb_crops": [1, 1], "size_crops": [16, 8],
             "min_scale_crops": [0.5, 0.2], "max_scale_crops": [1.0, 0.5]}
    dataset = DATASETS.build({"name": "TarShards", "root": str(tmp / "shards"),
                              "transforms": [crops], "seed": 4})
    by_hand = build_pipeline([crops])(decode_image(dataset.reader.read(30)),
                                      np.random.default_rng([4, 2, 30]))
    dataset.set_epoch(2)
    for got, expected in zip(dataset[30][0], by_hand):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_two_launched_processes_read_every_image_once_per_epoch(shards, tmp_path):
    tmp, _ = shards
    cfg = tiny_swav_config(tmp / "images", tmp_path / "run", hooks=[{"name": "ToyEngineDumpOrder"}])
    cfg["epochs"] = 2
    cfg["dataloader"]["train"]["dataset"] = {
        "name": "TarShards", "root": str(tmp / "shards"),
        "transforms": cfg["dataloader"]["train"]["dataset"]["transforms"]}
    cfg["dataloader"]["train"]["loader"] = {"num_workers": 2}
    result = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                             "2", "--log_dir", str(tmp_path / "log"), CLI, "-c",
                             write_config(cfg, tmp_path / "c.yaml")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, open(tmp_path / "log" / "workerlog.0").read()[-2000:]
    for epoch in (0, 1):
        orders = [np.load(tmp_path / "run" / f"order.rank{r}.epoch{epoch}.npy") for r in (0, 1)]
        assert sorted(np.concatenate(orders).tolist()) == list(range(IMAGES))
        dataset = DATASETS.build({"name": "TarShards", "root": str(tmp / "shards"), "seed": 3})
        for rank in (0, 1):  # what each launched rank read is the pure function's answer
            np.testing.assert_array_equal(orders[rank], epoch_order(
                dataset.shard_of, 3, epoch, rank, 2, dataset.shuffle_window))
    assert len(read_metrics(str(tmp_path / "run" / "metrics.jsonl"), "train")) == 12
