"""Semi-supervised configs: the r50 reference recipe at 1 and 8 processes, and the demo's low-shot one."""
import os

import numpy as np
import pytest

from data_helpers import write_image
from passl.config import load_config
from passl.data.registry import DATASETS
from passl.models import MODELS
from passl.solver.lr_scheduler import build_lr_scheduler
from passl.solver.optimizers import build_optimizer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "swav")
# (file, subset file, trunk lr, head lr) at the reference's global batch of 256
RECIPES = [("swav_semisup_r50_1pct.yaml", "1percent.txt", 0.02, 5.0),
           ("swav_semisup_r50_10pct.yaml", "10percent.txt", 0.01, 0.2)]


@pytest.fixture(scope="module")
def model():
    return MODELS.build(load_config(os.path.join(CONFIGS, RECIPES[0][0])).model)


@pytest.mark.parametrize("name, subset_file, trunk_lr, head_lr", RECIPES)
def test_reference_recipe(name, subset_file, trunk_lr, head_lr):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.epochs == 20 and cfg.model.freeze_backbone is False
    assert cfg.dataloader.train.sampler.batch_size * 8 == 256
    assert cfg.dataloader.train.dataset.subset == {"file": f"data/ILSVRC2012/{subset_file}"}
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 0.0
    assert cfg.lr_scheduler.name == "MultiStep" and cfg.lr_scheduler.milestones == [12, 16]
    assert cfg.lr_scheduler.gamma == 0.2 and cfg.lr_scheduler.reference_batch_size == 256


@pytest.mark.parametrize("name, subset_file, trunk_lr, head_lr", RECIPES)
@pytest.mark.parametrize("processes", [1, 8])
def test_group_lrs_follow_the_global_batch(model, name, subset_file, trunk_lr, head_lr,
                                           processes):
    cfg = load_config(os.path.join(CONFIGS, name))
    global_batch = cfg.dataloader.train.sampler.batch_size * processes
    schedule = build_lr_scheduler(cfg.lr_scheduler, cfg.epochs, iters_per_epoch=5,
                                  global_batch_size=global_batch)
    optimizer = build_optimizer(cfg.optimizer, model, schedule)
    scale = global_batch / 256
    lrs = {}
    for group in optimizer._param_groups:
        names = {p.name for p in group["params"]}
        owner = "head" if names == {model.fc.weight.name, model.fc.bias.name} else "trunk"
        lrs[owner] = schedule() * group["learning_rate"]
    assert lrs == pytest.approx({"trunk": trunk_lr * scale, "head": head_lr * scale})
    assert len(optimizer._param_groups) == 2
    trunk_params = sum(len(g["params"]) for g in optimizer._param_groups) - 2
    assert trunk_params == len([p for p in model.backbone.parameters() if not p.stop_gradient])
    # the milestones: x0.2 from epoch 12, x0.04 from epoch 16
    for iteration, factor in ((12 * 5 - 1, 1.0), (12 * 5, 0.2), (16 * 5, 0.04)):
        assert schedule.lr_at(iteration) == pytest.approx(head_lr * scale * factor)


def test_train_dataset_reads_a_simclr_subset_file(tmp_path):
    """The train block with its root and subset file moved to a tiny synset folder."""
    cfg = load_config(os.path.join(CONFIGS, RECIPES[0][0]))
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):
        for number in range(3):
            write_image(str(tmp_path / "train" / synset / f"{synset}_{number}.JPEG"), rng,
                        size=(16, 16))
    (tmp_path / "1percent.txt").write_text("n01443537_2.JPEG\nn01440764_0.JPEG\n")
    block = cfg.dataloader.train.dataset
    block["root"] = str(tmp_path / "train")
    block["subset"]["file"] = str(tmp_path / "1percent.txt")
    dataset = DATASETS.build(block)
    assert len(dataset) == 2 and dataset.labels.tolist() == [1, 0]
    image, label = dataset[0]
    assert image.shape == (3, 224, 224) and label == 1


def test_demo_low_shot_config_fine_tunes_with_five_labels_per_class():
    cfg = load_config(os.path.join(CONFIGS, "swav_semisup_r18_digits.yaml"))
    pretrain = load_config(os.path.join(CONFIGS, "swav_r18_digits.yaml"))
    assert cfg.dataloader.train.dataset.subset == {"per_class": 5, "seed": 0}
    assert cfg.model.freeze_backbone is False
    # the backbone the demo pretrains, so --pretrained loads it exactly
    assert cfg.model.backbone == pretrain.model.backbone
    model = MODELS.build(cfg.model)
    schedule = build_lr_scheduler(cfg.lr_scheduler, cfg.epochs, iters_per_epoch=5,
                                  global_batch_size=cfg.dataloader.train.sampler.batch_size)
    optimizer = build_optimizer(cfg.optimizer, model, schedule)
    trunk, head = optimizer._param_groups
    assert {p.name for p in head["params"]} == {model.fc.weight.name, model.fc.bias.name}
    assert schedule() * trunk["learning_rate"] < schedule() * head["learning_rate"]
