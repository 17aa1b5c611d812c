"""configs/swav/swav_r18_folder.yaml trains on a folder of one's own images as documented."""
import os

import numpy as np

from passl.config import load_config
from passl.engine.trainer import Trainer
from passl.io.metrics_log import read_metrics
from tiny_image_folder import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "swav", "swav_r18_folder.yaml")


def test_own_folder_recipe_trains_two_steps(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(4, 1), size=24)
    cfg = load_config(CONFIG, [f"dataloader.train.dataset.root={data / 'train'}",
                               f"output_dir={tmp_path / 'out'}", "epochs=1", "+threads=1",
                               "dataloader.train.sampler.batch_size=6",
                               "dataloader.train.loader.num_workers=0", "log_interval=1"])
    Trainer(cfg).train()
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "out" / "metrics.jsonl"), "train")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert os.path.isfile(tmp_path / "out" / "checkpoints" / "epoch_1.pd")
    # 12 images an epoch cannot fill the recipe's queue of 1920 (1920 = 320 batches of 6)
    log = (tmp_path / "out" / "train.log").read_text()
    assert ("WARNING SwAV queue: 1920 embeddings per assignment crop, but an epoch yields only "
            "12 (2 steps of 6)") in log
    assert "queue_length to at most 12" in log


def test_switching_to_an_image_list(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(2, 1), size=24)
    (tmp_path / "list.txt").write_text("0/0.png\n1/0.png\n")
    cfg = load_config(CONFIG, ["dataloader.train.dataset.name=ImageList",
                               f"dataloader.train.dataset.root={data / 'train'}",
                               f"+dataloader.train.dataset.list_file={tmp_path / 'list.txt'}"])
    assert cfg.dataloader.train.dataset.name == "ImageList"
    from passl.data import DATASETS
    assert len(DATASETS.build(cfg.dataloader.train.dataset)) == 2
