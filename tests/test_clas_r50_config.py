"""configs/swav/swav_clas_r50.yaml: the paper's linear protocol, and every block builds."""
import os

import numpy as np
import pytest

from passl.config import load_config
from passl.data.transforms import build_pipeline
from passl.engine.hooks import HOOKS
from passl.models import MODELS
from passl.solver.lr_scheduler import build_lr_scheduler
from passl.solver.optimizers import build_optimizer

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "swav", "swav_clas_r50.yaml")


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


def test_paper_settings(cfg):
    assert cfg.epochs == 100
    assert cfg.model.backbone == {"name": "ResNet", "depth": 50} and cfg.model.num_classes == 1000
    assert cfg.dataloader.train.sampler.batch_size * 8 == 256
    assert cfg.optimizer == {"name": "Momentum", "momentum": 0.9, "weight_decay": 1e-6}
    assert cfg.lr_scheduler.base_lr == 0.3 and cfg.lr_scheduler.reference_batch_size == 256
    assert cfg.lr_scheduler.final_lr == 0.0 and cfg.lr_scheduler.warmup_epochs == 0
    assert [t["name"] for t in cfg.dataloader.val.dataset.transforms] == \
        ["Resize", "CenterCrop", "Normalize"]


def test_blocks_build(cfg):
    model = MODELS.build(cfg.model)
    assert model.backbone.out_channels == 2048 and list(model.fc.weight.shape) == [2048, 1000]
    schedule = build_lr_scheduler(cfg.lr_scheduler, cfg.epochs, iters_per_epoch=10,
                                  global_batch_size=512)
    assert schedule.get_lr() == pytest.approx(0.6)  # 0.3 x 512 / 256
    optimizer = build_optimizer(cfg.optimizer, model, schedule)
    assert len(optimizer._parameter_list) == 2  # only the linear layer trains
    for block in cfg.hooks:
        HOOKS.build(block)
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    assert build_pipeline(cfg.dataloader.train.dataset.transforms)(image, rng).shape == (3, 224, 224)
    assert build_pipeline(cfg.dataloader.val.dataset.transforms)(image, rng).shape == (3, 224, 224)
