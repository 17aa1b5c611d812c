"""tools/benchmark.py kmeans: the JSON line and the ImageNet projection's arithmetic."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kmeans_benchmark_projects_linearly_in_the_rows_per_process():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "kmeans",
                          "--rows", "600", "--dim", "16", "--centroids", "20", "--iterations",
                          "2", "--repeats", "1", "--json"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["seconds_per_head"] > 0
    for processes, entry in result["imagenet"].items():
        rows = -(-1_281_167 // int(processes))
        assert entry["rows_per_process"] == rows
        assert abs(entry["seconds_per_epoch"] - result["seconds_per_head"] * rows / 600 * 3) \
            <= 1e-9 * entry["seconds_per_epoch"]
        assert abs(entry["bank_mb"] - rows * (8 + 4 * 2 * 16) / 2 ** 20) < 1e-9
        assert abs(entry["gflop_per_process"] - 2 * rows * 20 * 16 * 3 * 3 / 1e9) < 1e-6
    assert sorted(result["imagenet"], key=int) == ["1", "8", "64"]
