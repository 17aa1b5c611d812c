"""tools/knn_eval.py: the memory bank sees the val transforms; printed and recorded top-1 agree
with kNN computed here on the same weights."""
import json
import os
import re
import subprocess
import sys

import paddle
import pytest

from passl.config import load_config
from passl.data import build_dataloader
from passl.errors import ConfigError
from passl.evaluation.knn import knn_evaluate
from passl.evaluation.knn_eval import memory_bank_blocks
from passl.io.weights import load_pretrained
from passl.models import BACKBONES, MODELS
from tiny_image_folder import TINY_RESNET, linear_config, write_config, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "knn_eval.py")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("knn")
    data = write_image_folder(base / "data")
    return write_config(base / "linear.yaml", linear_config(data, base / "out"))


def test_memory_bank_uses_val_transforms(config_path):
    cfg = load_config(config_path)
    bank, queries = memory_bank_blocks(cfg)
    assert bank["dataset"]["root"] == cfg.dataloader.train.dataset.root
    assert bank["dataset"]["transforms"] == cfg.dataloader.val.dataset.transforms
    assert bank["sampler"]["shuffle"] is False and bank["sampler"]["drop_last"] is False
    assert cfg.dataloader.train.sampler.shuffle is True  # the config itself is untouched
    assert queries["dataset"] == cfg.dataloader.val.dataset

    del cfg.dataloader["val"]
    with pytest.raises(ConfigError, match="dataloader.val"):
        memory_bank_blocks(cfg)


def test_tool_prints_and_records_knn_of_the_weights(config_path, tmp_path):
    paddle.seed(11)
    weights = str(tmp_path / "backbone.pdparams")
    paddle.save(BACKBONES.build(dict(TINY_RESNET)).state_dict(), weights)
    proc = subprocess.run([sys.executable, TOOL, "-c", config_path, "--pretrained", weights,
                           "--k", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = float(re.search(r"kNN top-1 ([\d.]+)", proc.stdout).group(1))

    cfg = load_config(config_path)
    model = MODELS.build(cfg.model)
    load_pretrained(model.backbone, weights)
    bank, queries = memory_bank_blocks(cfg)
    expected = knn_evaluate(model, build_dataloader(bank, "val"), build_dataloader(queries, "val"),
                            k=5)
    assert printed == pytest.approx(expected["knn_top1"], abs=0.01)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    assert record["type"] == "eval" and record["pretrained"] == weights and record["k"] == 5
    assert record["knn_top1"] == pytest.approx(expected["knn_top1"])
    assert record["queries"] == 12
