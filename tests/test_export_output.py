"""tools/export_model.py prints only what a user can act on: no Paddle log lines on stderr."""
import os
import re
import subprocess
import sys

import paddle

from passl.models import BACKBONES
from passl.models.backbones.resnet import BasicBlock
from tiny_image_folder import TINY_RESNET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CLASSIFIER = os.path.join(ROOT, "configs", "swav", "swav_clas_r18_digits.yaml")
# glog's line prefix: severity letter, month and day (W1203 10:22:52.862854 ...)
GLOG_LINE = re.compile(r"^[IWEF]\d{4} ", re.MULTILINE)


def test_export_writes_no_paddle_log_lines(tmp_path):
    """A fresh process (Paddle logs the line once per process): the residual sum of the
    ResNet blocks used to make Paddle log "static graph(PIR) not support input out tensor"."""
    weights = str(tmp_path / "tiny.pdparams")
    paddle.save(BACKBONES.build(dict(TINY_RESNET)).state_dict(), weights)
    shape = [f"model.backbone.{key}={value}" for key, value in TINY_RESNET.items()
             if key != "name"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "-c", DIGITS_CLASSIFIER,
         "--pretrained", weights, "--output", str(tmp_path / "export"),
         *(arg for override in shape for arg in ("-o", override))],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "exported features" in proc.stdout
    assert not GLOG_LINE.search(proc.stderr), proc.stderr
    assert "not support input out tensor" not in proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr


def test_a_block_traced_for_export_computes_what_training_computes(tmp_path):
    block = BasicBlock(8, 8, 1, None, "NCHW")
    block.eval()
    images = paddle.randn([2, 8, 6, 6])
    prefix = str(tmp_path / "block")
    paddle.jit.save(block, prefix, input_spec=[paddle.static.InputSpec([None, 8, 6, 6])])
    traced = paddle.jit.load(prefix)
    assert float((traced(images) - block(images)).abs().max()) < 1e-5
