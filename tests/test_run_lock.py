"""One run per output_dir: a second run (or a resume) while one runs is refused naming the
holder; a lock left by a run that is gone is taken over; concurrent writers of one file never
see each other's temporary file."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import paddle
import pytest

from passl.engine.run_lock import LOCK_FILE, STALE_AFTER_SECONDS, RunLock, _process_start
from passl.errors import UserError
from passl.io import checkpoint
from passl.io.safe_write import write_text_atomic
from toy_training import toy_config, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(HERE, "toy_train_cli.py")


def write_lock(output_dir, holder, age=0.0):
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    with open(path, "w") as f:
        json.dump(holder, f)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def holder(pid, host=None, since="2026-01-02 03:04:05", pid_start="same"):
    return {"host": host or socket.gethostname(), "pid": pid,
            "pid_start": _process_start(pid) if pid_start == "same" else pid_start,
            "since": since}


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def refusal(output_dir, who):
    return (f"output_dir {output_dir} is in use by another run ({who}, lock file "
            f"{output_dir}/{LOCK_FILE}); wait for it to end, or use -o output_dir=NEW_DIR")


def test_live_holders_are_named_and_gone_ones_taken_over(tmp_path):
    out = str(tmp_path / "run")
    parent = os.getppid()  # alive, on this host
    write_lock(out, holder(parent))
    with pytest.raises(UserError) as refused:
        RunLock(out).acquire()
    assert str(refused.value) == refusal(out, f"{socket.gethostname()} PID {parent} since "
                                              f"2026-01-02 03:04:05")

    other_host = holder(12345, host="node-elsewhere")
    write_lock(out, other_host, age=STALE_AFTER_SECONDS - 60)  # heartbeat recent: alive
    with pytest.raises(UserError, match=r"node-elsewhere PID 12345 since"):
        RunLock(out).acquire()

    cases = [(holder(dead_pid()), 0, "that process has ended"),
             (holder(parent, pid_start="1"), 0, "that process has ended"),  # PID reused
             (other_host, STALE_AFTER_SECONDS + 60, f"no heartbeat for {STALE_AFTER_SECONDS + 60}")]
    for gone, age, why in cases:
        write_lock(out, gone, age)
        lock = RunLock(out)
        notice = lock.acquire()
        assert notice.startswith(f"took over {out}/{LOCK_FILE} from a run that is gone "
                                 f"({gone['host']} PID {gone['pid']} since ") and why in notice
        with open(os.path.join(out, LOCK_FILE)) as f:
            assert json.load(f)["pid"] == os.getpid()
        lock.release()
        assert os.listdir(out) == []  # released, and no temporary file left


def test_a_stale_lock_in_a_run_dir_is_taken_over_by_the_next_run(tmp_path, caplog):
    from passl.config import load_config
    from passl.engine.trainer import Trainer
    out = tmp_path / "run"
    write_lock(str(out), holder(dead_pid()))
    cfg = load_config(write_config(toy_config(out, epochs=1), tmp_path / "cfg.yaml"))
    trainer = Trainer(cfg)
    assert "from a run that is gone" in open(out / "train.log").read()
    assert json.load(open(out / LOCK_FILE))["pid"] == os.getpid()  # held while it runs
    trainer.train()
    assert not (out / LOCK_FILE).exists()
    assert os.path.isfile(out / "checkpoints" / "epoch_1.pd")


def test_a_resume_while_the_run_holds_the_lock_is_one_line(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "train_tool", os.path.join(os.path.dirname(HERE), "tools", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = str(tmp_path / "run")
    write_lock(out, holder(os.getppid()))
    cfg = write_config(toy_config(out, epochs=1), tmp_path / "cfg.yaml")
    with pytest.raises(SystemExit) as exit_info:
        train.run_cli(train.main, ["-c", cfg, "--resume", "auto"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + refusal(
        out, f"{socket.gethostname()} PID {os.getppid()} since 2026-01-02 03:04:05")
    assert os.listdir(out) == [LOCK_FILE]  # nothing written, the holder's lock kept


@pytest.mark.slow  # two Paddle processes, ~15 s
def test_two_runs_started_together_one_runs_the_other_is_refused(tmp_path):
    """Both runs start at once; the one that gets the lock waits in before_run (holding it)
    until the other has ended, so the refusal is certain, not a matter of timing."""
    go = tmp_path / "go"
    cfg = write_config(toy_config(tmp_path / "run", epochs=1,
                                  hooks=[{"name": "ToyEngineWaitFor", "path": str(go)}]),
                       tmp_path / "cfg.yaml")
    runs = [subprocess.Popen([sys.executable, CLI, "-c", cfg], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 240
    while all(run.poll() is None for run in runs) and time.time() < deadline:
        time.sleep(0.1)
    go.write_text("")
    results = [(run.wait(timeout=240), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close(), run.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = [line for line in next(err for code, err in results if code == 2).splitlines()
               if line.startswith("error:")]
    winner = next(run.pid for run, (code, _) in zip(runs, results) if code == 0)
    assert len(refused) == 1 and refused[0].startswith(
        f"error: output_dir {tmp_path / 'run'} is in use by another run "
        f"({socket.gethostname()} PID {winner} since ")
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["type"] for r in evals].count("summary") == 1  # one run's records only
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_concurrent_writers_of_one_path_never_clash(tmp_path):
    """Threads racing on write_text_atomic and checkpoint.write_atomic of one path: no
    writer fails, and a reader only ever sees one whole version."""
    text_path, ckpt_path = str(tmp_path / "config.yaml"), str(tmp_path / "epoch_1.pd")
    versions = {f"v{i}": (f"v{i}:" + str(i) * 200_000) for i in range(4)}
    arrays = {i: np.full(50_000, i, np.float32) for i in range(4)}
    errors, seen, stop = [], set(), threading.Event()

    def write(i):
        try:
            for _ in range(15):
                write_text_atomic(text_path, versions[f"v{i}"])
                checkpoint.write_atomic({"epoch": i, "w": arrays[i]}, ckpt_path)
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(repr(e))

    def read():
        while not stop.is_set():
            try:
                with open(text_path) as f:
                    text = f.read()
            except FileNotFoundError:
                continue
            seen.add(text.split(":")[0])
            if text not in versions.values():
                errors.append(f"torn read of {len(text)} characters")

    write_text_atomic(text_path, versions["v0"])
    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert errors == []
    state = paddle.load(ckpt_path, return_numpy=True)
    np.testing.assert_array_equal(state["w"], arrays[int(state["epoch"])])
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "epoch_1.pd"]  # no temporary left


@pytest.mark.slow  # two launches of two Paddle processes each, ~1 min
def test_two_launched_runs_into_one_folder_one_runs(tmp_path):
    """Under paddle.distributed.launch every process of the refused run stops with the
    holder line (process 0 holds the lock for all of its run's processes)."""
    go = tmp_path / "go"
    cfg = write_config(toy_config(tmp_path / "run", epochs=1, batch_size=4,
                                  hooks=[{"name": "ToyEngineWaitFor", "path": str(go)}]),
                       tmp_path / "cfg.yaml")
    runs = [subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch",
                              "--nproc_per_node", "2", "--log_dir", str(tmp_path / f"log{i}"),
                              CLI, "-c", cfg], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for i in range(2)]
    deadline = time.time() + 400
    while all(run.poll() is None for run in runs) and time.time() < deadline:
        time.sleep(0.2)
    go.write_text("")
    codes = [run.wait(timeout=400) for run in runs]
    assert sorted(code == 0 for code in codes) == [False, True], codes
    refused = codes.index(next(code for code in codes if code != 0))
    for rank in (0, 1):
        with open(tmp_path / f"log{refused}" / f"workerlog.{rank}") as f:
            errors = [line for line in f.read().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: output_dir {tmp_path / 'run'} is in use by another run "
            f"({socket.gethostname()} PID "), (rank, errors)
    assert not (tmp_path / "run" / LOCK_FILE).exists()
