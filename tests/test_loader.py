"""build_dataloader: batch structure, sampler modes, epochs, workers and config errors."""
import threading

import numpy as np
import paddle
import pytest

from data_helpers import make_image_folder
from passl.data.loader import build_dataloader, collate_batch, set_loader_epoch
from passl.errors import ConfigError, UserError

CROPS = {"name": "MultiCrop", "nmb_crops": [2, 1], "size_crops": [24, 12],
         "min_scale_crops": [0.3, 0.1], "max_scale_crops": [1.0, 0.3]}
PLAIN = [{"name": "Resize", "size": 20}, {"name": "CenterCrop", "size": 16},
         {"name": "Normalize"}, {"name": "ToCHW"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("loader") / "train", per_class=5)  # 15 images


def block(root, transforms, batch_size=4, **loader):
    return {"dataset": {"name": "ImageFolder", "root": root, "transforms": transforms},
            "sampler": {"batch_size": batch_size}, "loader": loader}


def epoch_batches(loader, epoch):
    set_loader_epoch(loader, epoch)
    return [(inputs, labels) for inputs, labels in loader]


def test_multicrop_batches_are_lists_of_bchw_tensors(folder):
    loader = build_dataloader(block(folder, [CROPS]), mode="train", seed=1)
    batches = epoch_batches(loader, 0)
    assert len(loader) == len(batches) == 3  # 15 // 4, last partial batch dropped
    inputs, labels = batches[0]
    assert isinstance(inputs, list)
    assert [tuple(t.shape) for t in inputs] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)]
    assert all(t.dtype == paddle.float32 for t in inputs)
    assert labels.dtype == paddle.int64 and tuple(labels.shape) == (4,)


def test_plain_batches_are_one_tensor_and_val_keeps_order(folder):
    loader = build_dataloader(block(folder, PLAIN), mode="val")
    batches = epoch_batches(loader, 0)
    assert [tuple(inputs.shape) for inputs, _ in batches] == [(4, 3, 16, 16)] * 3 + [(3, 3, 16, 16)]
    labels = np.concatenate([labels.numpy() for _, labels in batches])
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    first = batches[0][0].numpy()[0]
    assert np.allclose(first, loader.dataset[0][0])


def test_train_permutation_changes_across_epochs_and_repeats_per_epoch(folder):
    loader = build_dataloader(block(folder, PLAIN, batch_size=5), mode="train")
    order = {}
    for epoch in (0, 1, 0):
        images = [inputs.numpy() for inputs, _ in epoch_batches(loader, epoch)]
        order.setdefault(epoch, []).append(np.concatenate(images))
    assert np.array_equal(order[0][0], order[0][1])
    assert not np.array_equal(order[0][0], order[1][0])
    as_set = [sorted(map(bytes, images.reshape(15, -1))) for images in (order[0][0], order[1][0])]
    assert as_set[0] == as_set[1]  # every sample once per epoch (15 = 3 full batches of 5)


def test_workers_see_the_epoch_and_match_the_main_process(folder):
    inline = build_dataloader(block(folder, [CROPS], num_workers=0), seed=3)
    workers = build_dataloader(block(folder, [CROPS], num_workers=1), seed=3)
    for epoch in (0, 1):
        for (a_inputs, a_labels), (b_inputs, b_labels) in zip(epoch_batches(inline, epoch),
                                                              epoch_batches(workers, epoch)):
            assert np.array_equal(a_labels.numpy(), b_labels.numpy())
            assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(a_inputs, b_inputs))
    first = [epoch_batches(workers, epoch)[0][0][0].numpy() for epoch in (0, 1)]
    assert not np.array_equal(first[0], first[1])


def test_collate_batch_structure():
    crops = [[np.zeros((3, 4, 4), np.float32), np.ones((3, 2, 2), np.float32)] for _ in range(3)]
    inputs, labels = collate_batch(list(zip(crops, [1, -1, 2])))
    assert [x.shape for x in inputs] == [(3, 3, 4, 4), (3, 3, 2, 2)]
    assert labels.dtype == np.int64 and labels.tolist() == [1, -1, 2]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_is_one_line_with_and_without_workers(tmp_path, num_workers):
    root = make_image_folder(tmp_path / "bad", per_class=2)
    with open(f"{root}/cat/01.png", "wb") as f:
        f.write(b"not a png")
    loader = build_dataloader(block(root, PLAIN, batch_size=2, num_workers=num_workers),
                              mode="val")
    raised = []
    # started here: Paddle installs its worker signal handlers when the iterator starts, and
    # Python allows that only in the main thread
    batches = iter(loader)

    def read_all():  # in a thread: Paddle's own single-process reader hangs on this file
        try:
            list(batches)
        except UserError as e:
            raised.append(e)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the loader hung on a corrupt image"
    assert len(raised) == 1
    message = str(raised[0])
    assert message.startswith(f"{root}/cat/01.png:") and "\n" not in message


@pytest.mark.parametrize("change, message", [
    (lambda b: b["sampler"].update(batch_sizes=4),
     r"dataloader.train.sampler.batch_sizes: unknown key \(did you mean: batch_size"),
    (lambda b: b["sampler"].pop("batch_size"), r"dataloader.train.sampler: missing 'batch_size'"),
    (lambda b: b["loader"].update(workers=2), r"dataloader.train.loader.workers: unknown key"),
    (lambda b: b["sampler"].update(batch_size=64),
     r"batch_size: 64 per process leaves no full batch of the 15"),
    (lambda b: b.update(shuffle=True), r"dataloader.train.shuffle: unknown key"),
])
def test_config_mistakes_name_the_key(folder, change, message):
    cfg = block(folder, PLAIN)
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        build_dataloader(cfg, mode="train")


def test_two_ranks_split_the_epoch_and_augment_alike(folder, monkeypatch):
    """Each rank gets its own batches; a sample's crops do not depend on the rank."""
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
        monkeypatch.setenv("PADDLE_TRAINER_ID", str(rank))
        loader = build_dataloader(block(folder, [CROPS], batch_size=2), seed=4)
        assert loader.batch_sampler.nranks == 2 and loader.batch_sampler.local_rank == rank
        set_loader_epoch(loader, 1)
        per_rank.append([index for batch in loader.batch_sampler for index in batch])
    # 15 samples padded to 16 with sample 0 (Paddle's sampler), then shared out: 8 per rank
    assert len(per_rank[0]) == len(per_rank[1]) == 8
    assert sorted(per_rank[0] + per_rank[1]) == sorted(list(range(15)) + [0])
    monkeypatch.delenv("PADDLE_TRAINERS_NUM")
    single = build_dataloader(block(folder, [CROPS], batch_size=2), seed=4).dataset
    single.set_epoch(1)
    index = per_rank[1][0]
    crops_rank1 = loader.dataset[index][0]  # loader is rank 1's
    assert all(np.array_equal(a, b) for a, b in zip(crops_rank1, single[index][0]))


def test_val_shards_cover_every_sample_once_without_padding(monkeypatch):
    from paddle.io import Dataset

    from passl import distributed
    from passl.data.loader import build_batch_sampler

    class Seven(Dataset):
        def __len__(self):
            return 7

    seen = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "get_world_size", lambda: 3)
        sampler = build_batch_sampler(Seven(), "val", batch_size=2, shuffle=False, drop_last=False)
        seen += [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(7))
