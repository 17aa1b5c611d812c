"""Smoke test of ``tools/benchmark.py data``: the JSON contract, with tiny settings."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_benchmark_prints_a_table_and_ends_with_json():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "data", "--images", "2",
         "--rounds", "1", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("Pillow + paddle.vision.transforms") for line in lines)
    record = json.loads(lines[-1])
    for key in ("images_per_s", "baseline_images_per_s", "ratio"):
        assert isinstance(record[key], float) and record[key] > 0, key
    ratio = record["images_per_s"] / record["baseline_images_per_s"]
    assert abs(record["ratio"] - ratio) < 0.01 * ratio
    assert record["crops"] == "2x224+6x96" and record["images"] == 2


def test_data_benchmark_on_shards_compares_with_image_files():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "data", "--dataset",
         "shards", "--images", "2", "--rounds", "1", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[1].split() == ["pipeline", "images/s", "ms/image"]
    assert lines[2].startswith("PASSL OpenCV (TarShards + MultiCrop)")
    assert lines[3].startswith("PASSL OpenCV (ImageFolder + MultiCrop)")
    record = json.loads(lines[-1])
    assert record["dataset"] == "shards" and record["images"] == 2
    assert sorted(record["read_images_per_s"]) == ["folder_cold", "folder_warm", "shards_cold",
                                                   "shards_warm"]
    assert all(v > 0 for v in record["read_images_per_s"].values())
