"""tools/knn_eval.py in two processes prints what one process prints (same random init on every
rank, bank gathered, hits summed)."""
import os
import re
import subprocess
import sys

import pytest

from tiny_image_folder import linear_config, write_config, write_image_folder

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "knn_eval.py")


def printed_top1(output):
    return re.search(r"kNN top-1 ([\d.]+) .*\((.*)\)", output).groups()


@pytest.mark.slow
def test_two_processes_print_the_single_process_number(tmp_path):
    # Noisy enough that the random init matters (seeds 7 and 8 give different numbers), and
    # 30 / 18 images so that both ranks get equal shares without padding.
    data = write_image_folder(tmp_path / "data", per_class=(10, 6), noise=150)
    config = write_config(tmp_path / "c.yaml", linear_config(data, tmp_path / "out"))
    single = subprocess.run([sys.executable, TOOL, "-c", config, "--k", "5"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                             "2", "--log_dir", str(tmp_path / "log"), TOOL, "-c", config, "--k", "5"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    rank0 = (tmp_path / "log" / "workerlog.0").read_text()
    assert double.returncode == 0, double.stderr[-2000:] + rank0[-2000:]
    assert printed_top1(rank0) == printed_top1(single.stdout)
    assert "18 queries" in printed_top1(rank0)[1]
