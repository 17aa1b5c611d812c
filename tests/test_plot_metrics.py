"""tools/plot_metrics.py draws a PNG from metrics.jsonl and fails with one line otherwise."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from passl.cli import run_cli
from passl.errors import UserError
from passl.utils import plot_metrics
from test_cli import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "plot_metrics.py")
spec = importlib.util.spec_from_file_location("plot_metrics_tool", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def write_metrics(run_dir, records, extra=""):
    run_dir.mkdir(exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + extra)


def test_writes_png_next_to_metrics(tmp_path):
    records = [{"type": "train", "epoch": e + 1, "iter": e * 10 + i, "loss": 8.0 - 0.1 * i,
                "lr": 0.1, "ips": 50.0, "top1": 20.0} for e in range(3) for i in range(0, 10, 5)]
    records += [{"type": "eval", "epoch": e + 1, "iter": (e + 1) * 10, "knn_top1": 40.0 + e}
                for e in range(3)]
    write_metrics(tmp_path / "run", records)
    proc = run_tool(str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "(loss, lr, knn_top1)" in proc.stdout  # no eval top1: the train batches' one is not drawn
    with open(tmp_path / "run" / "metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert tool.main([str(tmp_path / "run" / "metrics.jsonl"), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.parametrize("content, fragment", [
    (None, "file not found"),
    ('{"type": "train", "loss": 1.0, "iter": 1}\n{not json\n{"iter": 2}\n', "not valid JSON"),
    ('{"type": "train", "epoch": 1, "ips": 3.0}\n', "no loss, lr, top1 or knn_top1 values"),
])
def test_user_errors_are_one_line(tmp_path, capsys, content, fragment):
    if content is not None:
        write_metrics(tmp_path / "run", [], extra=content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tool.main, [str(tmp_path / "run")])  # in-process: what the script's __main__ does
    assert exit_info.value.code == 2
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, fragment)


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run", [{"type": "train", "iter": 1, "loss": 1.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match=r"pip install -e \.\[plot\]"):
        plot_metrics.plot_metrics(str(tmp_path / "run" / "metrics.jsonl"), str(tmp_path / "x.png"))


def test_evaluate_only_records_are_not_curve_points():
    from passl.utils.plot_metrics import curve
    records = [{"type": "eval", "epoch": 1, "top1": 50.0},
               {"type": "eval", "epoch": 2, "top1": 60.0},
               {"type": "eval", "epoch": 2, "top1": 60.0, "evaluate_only": True},
               {"type": "eval", "epoch": None, "top1": 10.0, "evaluate_only": True}]
    assert curve(records, "eval", "epoch", "top1") == ([1, 2], [50.0, 60.0])


def test_prototypes_used_gets_its_own_panel(tmp_path):
    records = [{"type": "train", "epoch": 1, "iter": i, "loss": 3.0, "lr": 0.1,
                "prototypes_used": 0.5 + 0.1 * i} for i in range(3)]
    write_metrics(tmp_path / "run", records)
    curves = plot_metrics.plot_metrics(str(tmp_path / "run" / "metrics.jsonl"), str(tmp_path / "m.png"))
    assert curves == ["loss", "lr", "prototypes_used"]
    xs, ys = plot_metrics.curve(records, "train", "iter", "prototypes_used")
    assert xs == [0, 1, 2] and ys == pytest.approx([0.5, 0.6, 0.7])
