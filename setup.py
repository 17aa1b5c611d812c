"""Install with `pip install -e .` (CPU) or `pip install -e .[dev]` (adds the test tools).

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


setup(
    name="passl-swav",
    version="0.1.0",
    description="SwAV self-supervised pretraining and evaluation in PaddlePaddle",
    python_requires=">=3.9",
    packages=find_packages(include=["passl", "passl.*"]),
    install_requires=requirements(),
    extras_require={
        # the tests plot too, and fuzz the file readers with hypothesis
        "dev": ["pytest>=7.0", "scipy>=1.10", "matplotlib>=3.7", "hypothesis>=6.0"],
        "plot": ["matplotlib>=3.7"],
        "visualdl": ["visualdl>=2.5"],
    },
)
