"""Install with `pip install -e .` (CPU) or `pip install -e .[dev]` (adds the test tools);
`pip install -e .[onnx]` adds ONNX export and onnxruntime.

GPU users install paddlepaddle-gpu first and set PASSL_PADDLE=paddlepaddle-gpu so
that this package does not pull in the CPU wheel (see README).
"""
import os

from setuptools import find_packages, setup


def requirements():
    with open(os.path.join(os.path.dirname(__file__), "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    paddle = os.environ.get("PASSL_PADDLE", "paddlepaddle")
    return [paddle + line[len("paddlepaddle"):] if line.startswith("paddlepaddle") else line
            for line in lines if line]


#: ONNX export (tools/export_model.py --format onnx) and running .onnx files
ONNX = ["paddle2onnx>=2.0", "onnxruntime>=1.16", "onnx>=1.15"]

setup(
    name="passl-swav",
    version="0.1.0",
    description="SwAV self-supervised pretraining and evaluation in PaddlePaddle",
    python_requires=">=3.9",
    packages=find_packages(include=["passl", "passl.*"]),
    install_requires=requirements(),
    extras_require={
        # the tests plot, fuzz the file readers with hypothesis, and run ONNX export/inference
        # (~40 MB of wheels) so CI covers it
        "dev": ["pytest>=7.0", "scipy>=1.10", "matplotlib>=3.7", "hypothesis>=6.0", *ONNX],
        "plot": ["matplotlib>=3.7"],
        "onnx": ONNX,
        "visualdl": ["visualdl>=2.5"],
    },
)
