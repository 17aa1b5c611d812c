"""Two launchers on this machine as two nodes (gloo over loopback), and rendezvous failures
that end with one line instead of hanging (tools/launch.py)."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from passl.io.metrics_log import read_metrics
from passl.rendezvous import diagnose, launcher_option
from test_multiprocess_train import CLI, deterministic_config, tiny_swav_config
from tiny_image_folder import write_image_folder
from toy_training import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "tools", "launch.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(tmp_path, name, master, nnodes, script_args, timeout=120):
    return subprocess.Popen(
        [sys.executable, LAUNCH, "--rendezvous-timeout", str(timeout), "--master", master,
         "--nnodes", str(nnodes), "--nproc_per_node", "1", "--log_dir", str(tmp_path / name),
         CLI, *script_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, err


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_node_with_two_processes(tmp_path):
    one = write_config(deterministic_config(tmp_path / "one", batch_size=4), tmp_path / "one.yaml")
    result = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                             "2", "--log_dir", str(tmp_path / "log_one"), CLI, "-c", one],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    nodes_cfg = write_config(deterministic_config(tmp_path / "nodes", batch_size=4),
                             tmp_path / "nodes.yaml")
    master = f"127.0.0.1:{free_port()}"
    launched = [node(tmp_path, f"log_node{i}", master, 2, ["-c", nodes_cfg]) for i in (0, 1)]
    for process in launched:
        code, err = finish(process)
        assert code == 0, err[-2000:]

    losses = [[r["loss"] for r in read_metrics(str(tmp_path / d / "metrics.jsonl"), "train")]
              for d in ("one", "nodes")]
    assert len(losses[0]) == len(losses[1]) == 12
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)
    reference = np.load(tmp_path / "one" / "params.rank0.npz")
    for rank in (0, 1):
        params = np.load(tmp_path / "nodes" / f"params.rank{rank}.npz")
        for name in reference:
            np.testing.assert_allclose(params[name], reference[name], atol=1e-5, err_msg=name)
    assert "global batch 8 = 4 per process x 2 process(es)" in \
        open(tmp_path / "nodes" / "train.log").read()

    # rank 1 is SIGKILLed in epoch 1: both launches end (gloo aborts the survivor) with one
    # line saying what to do, and the same command with --resume auto finishes the run
    killed = deterministic_config(tmp_path / "killed", batch_size=4)
    killed["hooks"].append({"name": "ToyEngineKill", "epoch": 1, "inner_iter": 2, "rank": 1})
    killed_cfg = write_config(killed, tmp_path / "killed.yaml")
    master = f"127.0.0.1:{free_port()}"
    launched = [node(tmp_path, f"log_k{i}", master, 2, ["-c", killed_cfg]) for i in (0, 1)]
    ends = [finish(process) for process in launched]
    assert all(code != 0 for code, _ in ends)
    assert any(last_line(err).startswith("error: the launch failed (exit code ") and
               last_line(err).endswith("run the same command with --resume auto on every node "
                                       "to continue from the last checkpoint")
               for _, err in ends), [err[-500:] for _, err in ends]
    master = f"127.0.0.1:{free_port()}"
    launched = [node(tmp_path, f"log_r{i}", master, 2, ["-c", killed_cfg, "--resume", "auto"])
                for i in (0, 1)]
    for process in launched:
        code, err = finish(process)
        assert code == 0, err[-2000:]
    resumed = [r["loss"] for r in read_metrics(str(tmp_path / "killed" / "metrics.jsonl"), "train")]
    np.testing.assert_allclose(resumed, losses[0], atol=1e-5)


def train_losses(output_dir):
    return [r["loss"] for r in read_metrics(str(output_dir / "metrics.jsonl"), "train")]


@pytest.mark.slow
def test_swav_on_two_nodes_matches_one_node(tmp_path):
    """Distributed Sinkhorn, the per-rank queue and per-process BatchNorm: 2 x 1 = 1 x 2."""
    data = write_image_folder(tmp_path / "images", per_class=(16, 1))

    def config(name):  # threads: auto would give 1 thread per process here, 2 on each "node"
        return write_config({**tiny_swav_config(data, tmp_path / name), "threads": 1},
                            tmp_path / f"{name}.yaml")

    one = config("one")
    result = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                             "2", "--log_dir", str(tmp_path / "log_one"), CLI, "-c", one],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    nodes = config("nodes")
    master = f"127.0.0.1:{free_port()}"
    for process in [node(tmp_path, f"log_node{i}", master, 2, ["-c", nodes]) for i in (0, 1)]:
        code, err = finish(process, timeout=600)
        assert code == 0, err[-2000:]
    losses = [train_losses(tmp_path / d) for d in ("one", "nodes")]
    assert len(losses[0]) == 18  # 3 epochs x 6 steps, the queue in use from epoch 1
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)


def last_line(err):
    return err.strip().splitlines()[-1]


@pytest.mark.slow
def test_rendezvous_failures_end_with_one_line_not_a_hang(tmp_path):
    cfg = write_config(deterministic_config(tmp_path / "out", batch_size=4), tmp_path / "c.yaml")
    args = ["-c", cfg]
    stale = socket.socket()  # listens (the kernel accepts) but never answers: a stale port
    stale.bind(("127.0.0.1", 0))
    stale.listen(8)
    stale_master = f"127.0.0.1:{stale.getsockname()[1]}"
    shared = f"127.0.0.1:{free_port()}"
    started = {
        "stale": node(tmp_path, "log_stale", stale_master, 2, args, timeout=15),
        "unreachable": node(tmp_path, "log_unreachable", "192.0.2.1:6170", 2, args, timeout=15),
        # long enough for the process to start on a loaded machine (it has to, for the message)
        "nnodes2": node(tmp_path, "log_n2", shared, 2, args, timeout=45),
        "nnodes3": node(tmp_path, "log_n3", shared, 3, args, timeout=75),
    }
    results = {name: finish(process, timeout=120) for name, process in started.items()}
    stale.close()
    prefix = "error: no rendezvous within --rendezvous-timeout "
    for name, (code, err) in results.items():
        assert code == 2, (name, err[-1500:])
        assert last_line(err).startswith(prefix), (name, err[-1500:])
    assert last_line(results["stale"][1]) == (
        f"{prefix}15 s: port {stale_master.split(':')[1]} on 127.0.0.1 is held by another "
        f"program (a process left over from an earlier run?): stop it or choose a free port in "
        f"--master")
    assert last_line(results["unreachable"][1]).startswith(
        f"{prefix}15 s: master 192.0.2.1:6170 is unreachable from this node (")
    # the 2-node launcher meets the 3-node one and starts its process, which finds no peer
    assert last_line(results["nnodes2"][1]) == (
        f"{prefix}45 s: this node's 1 process(es) started but the process group never formed: "
        f"a process of another node is missing (started with another --nnodes, or failed: see "
        f"its log); start the same command on every node with the same --nnodes (this node: 2) "
        f"and --master")


def test_launcher_options_are_read_only_before_the_training_script():
    args = ["--master=10.0.0.1:6170", "--nnodes", "2", "tools/train.py", "--nnodes", "9"]
    assert launcher_option(args, "--master") == "10.0.0.1:6170"
    assert launcher_option(args, "--nnodes") == "2"
    assert launcher_option(args, "--nproc_per_node", "1") == "1"


def test_a_closed_master_port_is_reported_unreachable():
    master = f"127.0.0.1:{free_port()}"
    assert diagnose(master, "2", started=0) == (
        f"master {master} is unreachable from this node (Connection refused); start the master "
        f"node (node rank 0) first or fix the --master address, and check firewalls")


@pytest.mark.parametrize("args, message", [
    (["--rendezvous-timeout", "soon", "tools/train.py"],
     "error: --rendezvous-timeout 'soon': expected a positive number of seconds"),
    (["--rendezvous-timeout=10", "--nnodes", "2"],
     "error: no training script: usage: tools/launch.py [--rendezvous-timeout S] "
     "LAUNCH_ARGS... tools/train.py -c CFG"),
])
def test_launch_tool_flag_mistakes_are_one_line(args, message):
    result = subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (2, message + "\n")
