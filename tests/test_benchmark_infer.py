"""tools/benchmark.py infer: the JSON contract, the choice of the fastest exact variant, and a
CI-sized run without PyTorch."""
import importlib.util
import json
import os

import pytest

from benchmarks.infer import EXACT, headline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool",
                                                  os.path.join(ROOT, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headline_takes_the_fastest_exact_float32_variant():
    variants = {
        "paddle-dygraph": {"images_per_s": 10.0},
        "paddle-inference": {"images_per_s": 11.0, "relative_difference": 0.0},
        "paddle-inference-onednn": {"images_per_s": 20.0, "relative_difference": 5e-7},
        "paddle-inference-bf16": {"images_per_s": 40.0, "relative_difference": 5e-3},
        "torch-eager": {"images_per_s": 12.0},
        "torch-channels-last": {"images_per_s": 16.0},
    }
    summary = headline(variants)
    assert summary == {"images_per_s": 20.0, "variant": "paddle-inference-onednn",
                       "baseline": "torch-eager", "baseline_images_per_s": 12.0,
                       "ratio": round(20 / 12, 3), "torch_best_variant": "torch-channels-last",
                       "vs_torch_best": 1.25}
    variants["paddle-inference-onednn"]["relative_difference"] = 2 * EXACT  # no longer exact
    del variants["torch-eager"], variants["torch-channels-last"]
    summary = headline(variants)
    assert (summary["variant"], summary["baseline"], summary["ratio"]) == (
        "paddle-inference", "paddle-dygraph", 1.1)
    assert "vs_torch_best" not in summary


def test_ci_sized_run_without_torch(capsys):
    tool = load_benchmark_tool()
    code = tool.main(["infer", "--depth", "18", "--layers", "1", "1", "1", "1", "--base-width",
                      "8", "--stem", "small", "--image-size", "32", "--batch-size", "2",
                      "--threads", "1", "--rounds", "1", "--steps", "1", "--warmup", "0",
                      "--torch-python", "none", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert "PyTorch variants skipped: no torch in none" in out
    assert result["baseline"] == "paddle-dygraph"
    assert result["ratio"] == pytest.approx(
        result["images_per_s"] / result["baseline_images_per_s"], rel=1e-3)
    assert result["variants"][result["variant"]]["images_per_s"] == result["images_per_s"]
    assert set(result["variants"]) >= {"paddle-dygraph", "paddle-inference",
                                       "paddle-inference-onednn"}
    for name in ("paddle-inference", "paddle-inference-onednn"):
        assert result["variants"][name]["relative_difference"] <= EXACT
    assert result["variants"]["paddle-dygraph"]["relative_difference"] == 0.0
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("paddle2onnx"):
        assert result["variants"]["onnxruntime"]["relative_difference"] <= 1e-4
    else:
        assert "onnxruntime variant skipped: " in out
    if "paddle-inference-bf16" in result["variants"]:  # CPUs with AVX512-BF16
        assert 0 < result["variants"]["paddle-inference-bf16"]["relative_difference"] < 0.1
