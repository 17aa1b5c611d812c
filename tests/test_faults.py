"""Faults a cluster throws at a run: preemption signals, a full disk, a killed data worker,
a dead rank. Each ends with one line (no traceback), a distinct status and the previous
checkpoint intact; a preempted run resumes mid-epoch exactly."""
import errno
import logging
import os
import re
import signal
import subprocess
import sys

import paddle
import pytest

from passl import distributed, preemption
from passl.config import load_config, save_config
from passl.data.loader import ResumableBatchSampler, set_loader_epoch, worker_death
from passl.engine.continuation import how_to_continue, training_command
from passl.engine.trainer import Trainer
from passl.io import checkpoint
from passl.io import safe_write
from passl.io.metrics_log import MetricsLog, read_metrics
from passl.io.safe_write import OutputWriteError
from passl.io.weights import extract_weights
from passl.preemption import (STOP_SIGNALS, STOPPED_STATUS, StopSignals, TrainingStopped,
                              interrupt_on_stop_signals)
from passl.utils.logger import LogFileHandler
from test_checkpoint import assert_same_run
from test_multiprocess_train import assert_same_two_process_swav_run, launch, tiny_swav_config
from tiny_image_folder import write_image_folder
from toy_training import fill_disk, toy_config, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(HERE, "toy_train_cli.py")
TRAIN = os.path.join(os.path.dirname(HERE), "tools", "train.py")
ENOSPC = os.strerror(errno.ENOSPC)


def run_cli(cfg_path, *args):
    return subprocess.run([sys.executable, CLI, "-c", cfg_path, *args], capture_output=True,
                          text=True, timeout=300)


def last_line(stderr):
    return stderr.strip().splitlines()[-1]


def error_line(stderr):
    """The one ``error:`` line of ``stderr`` (a worker log, where more may follow)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def checkpoints_in(output_dir):
    return sorted(os.listdir(checkpoint.checkpoint_dir(str(output_dir))))


def signal_hook(epoch, inner_iter, name, **extra):
    return {"name": "ToyEngineKill", "epoch": epoch, "inner_iter": inner_iter, "signal": name,
            **extra}


def toy_run(tmp_path, name, hooks=(), **kwargs):
    """(config path, config) of the toy run with evaluation and ``hooks``."""
    cfg = toy_config(tmp_path / name, val=True, hooks=[{"name": "ToyEngineAccuracy"}, *hooks],
                     **kwargs)
    return write_config(cfg, tmp_path / f"{name}.yaml"), cfg


# ---------------------------------------------------------------- preemption


def test_sigterm_mid_epoch_saves_and_resume_auto_matches_the_uninterrupted_run(tmp_path):
    # records every 3 steps (and at each epoch's end): the stop cuts one logging interval
    whole_cfg, _ = toy_run(tmp_path, "whole", log_interval=3)
    Trainer(load_config(whole_cfg)).train()
    # SIGTERM arrives before step 2 of epoch 2: that step finishes, then the run stops
    cfg_path, _ = toy_run(tmp_path, "stopped", log_interval=3,
                          hooks=[signal_hook(1, 1, "SIGTERM")])
    first = run_cli(cfg_path)
    out = str(tmp_path / "stopped")
    saved = os.path.join(out, "checkpoints", "epoch_2_step_2.pd")
    assert first.returncode == STOPPED_STATUS, first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    assert last_line(first.stderr) == (f"stopped by SIGTERM after iteration 6; checkpoint {saved}; "
                                       f"continue with: python {TRAIN} -c {cfg_path} --resume auto")
    assert checkpoints_in(out) == ["epoch_1.pd", "epoch_2_step_2.pd", "latest.pd"]
    assert os.readlink(os.path.join(out, "checkpoints", "latest.pd")) == "epoch_2_step_2.pd"
    state = checkpoint.load_checkpoint(saved)
    assert (state["epoch"], state["steps_in_epoch"], state["iter"]) == (1, 2, 6)
    assert [r["iter"] for r in read_metrics(os.path.join(out, "metrics.jsonl"), "train")] == [3, 4]

    resumed = Trainer(load_config(cfg_path), resume="auto")
    assert (resumed.start_epoch, resumed.start_step, resumed.iter) == (1, 2, 6)
    resumed.train()
    assert_same_run(str(tmp_path / "whole"), out)  # the record at iter 7 averages 5, 6, 7
    # the mid-epoch file gave way to the next epoch's checkpoint
    assert checkpoints_in(out) == ["epoch_1.pd", "epoch_2.pd", "epoch_3.pd", "latest.pd"]


def test_a_mid_epoch_checkpoint_refuses_another_layout(tmp_path):
    cfg_path, _ = toy_run(tmp_path, "stopped", hooks=[signal_hook(1, 1, "SIGTERM")])
    assert run_cli(cfg_path).returncode == STOPPED_STATUS
    saved = os.path.join(str(tmp_path / "stopped"), "checkpoints", "epoch_2_step_2.pd")
    other_batch = run_cli(cfg_path, "--resume", "auto", "-o", "dataloader.train.sampler.batch_size=4")
    assert other_batch.returncode == 2 and "Traceback" not in other_batch.stderr
    assert error_line(other_batch.stderr) == (
        f"error: --resume {saved}: a mid-epoch checkpoint (step 2 of epoch 2) resumes only with "
        f"the layout that wrote it (1 process(es), global batch 8); resume it so until the "
        f"epoch ends, or resume from an epoch_N.pd checkpoint")


@pytest.fixture
def keep_signal_handlers():
    """Restore this process's handlers (a stopped run leaves SIGTERM and SIGUSR1 ignored)."""
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@pytest.mark.parametrize("name", ["SIGINT", "SIGUSR1"])  # a first Ctrl-C; SLURM's --signal
def test_first_ctrl_c_or_sigusr1_stops_with_a_checkpoint_after_the_step(tmp_path, name,
                                                                         keep_signal_handlers):
    cfg_path, _ = toy_run(tmp_path, "run", hooks=[signal_hook(0, 1, name)])
    trainer = Trainer(load_config(cfg_path))
    with pytest.raises(TrainingStopped) as stopped:
        trainer.train()
    assert (stopped.value.signal_name, stopped.value.iteration) == (name, 2)
    assert stopped.value.checkpoint == os.path.join(trainer.output_dir, "checkpoints",
                                                    "epoch_1_step_2.pd")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the process is on its way out
    summary = read_metrics(os.path.join(trainer.output_dir, "metrics.jsonl"), "summary")
    assert summary[-1]["completed"] is False and summary[-1]["iter"] == 2


def test_several_processes_agree_on_a_stop_every_few_steps_not_every_step(monkeypatch):
    """Each agreement reads an all-reduced value on the host (a wait for the GPU): several
    processes agree about every ``seconds`` of training, at least every ``max_interval``
    steps and at each epoch's end, the interval derived from all-reduced values only."""
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_reduce", lambda tensor, op: tensor)  # rank 1 alike
    clock = [0.0]
    monkeypatch.setattr(preemption.time, "perf_counter", lambda: clock[0])
    stops = StopSignals(logging.getLogger("test"), max_interval=50, seconds=2.0)

    def agreements(steps, step_seconds, epoch_end=None, signal_at=None):
        seen = []
        for steps_done in steps:
            clock[0] += step_seconds
            if steps_done == signal_at:
                stops.received = signal.SIGTERM
            if stops.due(steps_done, end_of_epoch=steps_done == epoch_end):
                seen.append((steps_done, stops.agreed(False, steps_done)[0]))
        return seen
    # 0.5 s steps: every 4 steps (2 s), and at the epoch's end (step 28)
    assert [s for s, _ in agreements(range(1, 41), 0.5, epoch_end=28)] == [
        1, 2, 6, 10, 14, 18, 22, 26, 28, 32, 36, 40]
    # 10 ms steps: 200 would make 2 s, the log interval caps it at 50; a signal received at
    # step 60 is agreed on at step 94, the next agreement
    assert agreements(range(41, 100), 0.01, signal_at=60) == [(44, 0), (94, signal.SIGTERM)]
    monkeypatch.setattr(distributed, "get_world_size", lambda: 1)
    assert all(stops.due(steps_done) for steps_done in range(100, 110))  # alone: every step


def test_before_training_sigterm_interrupts_at_once(keep_signal_handlers):
    interrupt_on_stop_signals()  # tools/train.py, once Paddle is loaded
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler right after the call


def test_second_ctrl_c_aborts_at_once_and_names_the_last_checkpoint(tmp_path):
    cfg_path, cfg = toy_run(tmp_path, "run", hooks=[signal_hook(1, 1, "SIGINT", times=2)])
    # a loader worker is running when the run aborts: it ignores SIGTERM, and the process
    # must still exit (it closes its loaders at exit) instead of waiting for it forever
    cfg["dataloader"]["train"]["loader"] = {"num_workers": 1}
    write_config(cfg, cfg_path)
    result = run_cli(cfg_path)
    out = str(tmp_path / "run")
    assert result.returncode == 130
    assert "Traceback" not in result.stderr
    assert last_line(result.stderr) == (
        f"error: interrupted; last checkpoint {out}/checkpoints/epoch_1.pd; "
        f"continue with: python {TRAIN} -c {cfg_path} --resume auto")
    assert checkpoints_in(out) == ["epoch_1.pd", "latest.pd"]  # nothing saved on abort


def test_continuation_text_and_resume_command(tmp_path, monkeypatch):
    argv = ["tools/train.py", "-c", "my run.yaml", "--pretrained", "w.pdparams", "-o",
            "epochs=5", "--resume=old.pd", "--pretrained-nonstrict"]
    assert training_command(argv) == \
        "python tools/train.py -c 'my run.yaml' -o epochs=5 --resume auto"
    assert how_to_continue(str(tmp_path), argv) == (
        "no checkpoint was written yet; start again with: python tools/train.py -c 'my run.yaml' "
        "--pretrained w.pdparams -o epochs=5 --resume=old.pd --pretrained-nonstrict")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "2")
    assert training_command(["tools/train.py", "-c", "a.yaml"]) == \
        "python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py -c a.yaml " \
        "--resume auto"


def test_mid_epoch_files_are_named_by_position_and_pruned_by_later_checkpoints(tmp_path):
    def state(epoch, steps):
        return {"kind": checkpoint.KIND, "epoch": epoch, "steps_in_epoch": steps}
    directory = str(tmp_path)
    checkpoint.save_checkpoint(state(4, 2), directory)  # left by an earlier, longer run
    assert checkpoint.save_checkpoint(state(1, 3), directory) == \
        os.path.join(directory, "epoch_2_step_3.pd")  # 3 steps into the 2nd epoch
    checkpoint.save_checkpoint(state(1, 5), directory)
    assert sorted(os.listdir(directory)) == ["epoch_2_step_5.pd", "epoch_5_step_2.pd",
                                             "latest.pd"]
    checkpoint.save_checkpoint(state(2, 0), directory, keep_last=1)
    assert sorted(os.listdir(directory)) == ["epoch_2.pd", "epoch_5_step_2.pd", "latest.pd"]
    assert checkpoint.last_checkpoint(str(tmp_path.parent)) is None  # no checkpoints/ there
    assert os.readlink(tmp_path / "latest.pd") == "epoch_2.pd"


def test_skipping_batches_gives_the_rest_of_the_epochs_order():
    data = paddle.io.TensorDataset([paddle.arange(20, dtype="float32")])
    data.set_epoch = lambda epoch: None
    sampler = ResumableBatchSampler(data, batch_size=3, shuffle=True, drop_last=True)
    loader = paddle.io.DataLoader(data, batch_sampler=sampler)
    set_loader_epoch(loader, 4)
    whole = list(sampler)
    set_loader_epoch(loader, 4, skip_batches=2)
    assert list(sampler) == whole[2:] and len(sampler) == len(whole) == 6
    set_loader_epoch(loader, 4)
    assert list(sampler) == whole  # the skip applied to one epoch only


# ---------------------------------------------------------------- full disk


def test_full_disk_at_a_checkpoint_stops_with_one_line_and_keeps_the_last_one(tmp_path):
    cfg_path, _ = toy_run(tmp_path, "run", hooks=[{"name": "ToyEngineDiskFull", "epoch": 1}])
    result = run_cli(cfg_path)
    out = str(tmp_path / "run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = last_line(result.stderr)
    assert re.fullmatch(
        re.escape(f"error: cannot write {out}/checkpoints/epoch_2.pd: {ENOSPC} (")
        + r"[\d.]+ [KMG]?B"
        + re.escape(f" free on its file system); last checkpoint {out}/checkpoints/epoch_1.pd; "
                    f"continue with: python {TRAIN} -c {cfg_path} --resume auto"), line), line
    assert checkpoints_in(out) == ["epoch_1.pd", "latest.pd"]  # no partial file, no .tmp
    assert checkpoint.load_checkpoint(os.path.join(out, "checkpoints", "latest.pd"))["epoch"] == 1
    # the run stopped there: no step of epoch 3
    assert read_metrics(os.path.join(out, "metrics.jsonl"), "train")[-1]["iter"] == 8


def failing_writes(monkeypatch):
    """Every append writes half its bytes, then the disk is full."""
    def half_then_enospc(fd, data):
        os.write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, ENOSPC)
    monkeypatch.setattr(safe_write, "_write_all", half_then_enospc)


def test_metrics_log_on_a_full_disk_leaves_no_torn_line_and_stops_writing(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    log.write({"type": "train", "iter": 1, "loss": 1.5})
    before = open(path).read()
    failing_writes(monkeypatch)
    with pytest.raises(OutputWriteError, match=f"^cannot write {re.escape(path)}: {ENOSPC} "):
        log.write({"type": "train", "iter": 2, "loss": 1.25})
    log.write({"type": "summary", "iter": 2})  # the end-of-run record is skipped, not raised
    assert open(path).read() == before


def test_metrics_on_a_full_disk_stop_the_run_at_the_step_with_one_line(tmp_path):
    cfg_path, _ = toy_run(tmp_path, "run", hooks=[{"name": "ToyEngineDiskFull", "epoch": 1,
                                                       "what": "metrics"}])
    result = run_cli(cfg_path)
    out = str(tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_line(result.stderr).startswith(
        f"error: cannot write {out}/metrics.jsonl: {ENOSPC} (")
    assert f"last checkpoint {out}/checkpoints/epoch_1.pd; continue with:" in result.stderr
    assert checkpoints_in(out) == ["epoch_1.pd", "latest.pd"]
    assert max(r["iter"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))) == 4


def test_config_yaml_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "config.yaml")
    save_config({"epochs": 3}, path)

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, ENOSPC)
    monkeypatch.setattr(safe_write.os, "replace", full_disk)
    with pytest.raises(OutputWriteError, match=f"^cannot write {re.escape(path)}: {ENOSPC} "):
        save_config({"epochs": 5}, path)
    monkeypatch.undo()
    assert load_config(path)["epochs"] == 3 and os.listdir(tmp_path) == ["config.yaml"]


def test_extracted_weights_on_a_full_disk_leave_no_file(tmp_path, monkeypatch):
    trainer_cfg, _ = toy_run(tmp_path, "run", epochs=1)
    Trainer(load_config(trainer_cfg)).train()
    monkeypatch.setattr(checkpoint.paddle, "save", lambda obj, path, *a, **k: fill_disk(path))
    output = str(tmp_path / "weights" / "backbone.pdparams")
    with pytest.raises(OutputWriteError, match=f"^cannot write {re.escape(output)}: {ENOSPC} "):
        extract_weights(str(tmp_path / "run" / "checkpoints" / "latest.pd"), output)
    assert os.listdir(tmp_path / "weights") == []


def test_log_file_on_a_full_disk_says_so_once(tmp_path, capsys):
    handler = LogFileHandler(str(tmp_path / "train.log"))

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, ENOSPC)

        def flush(self):
            pass

    handler.stream = FullDisk()
    logger = logging.getLogger("passl.test_faults")
    logger.addHandler(handler)
    try:
        logger.warning("one")
        logger.warning("two")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: cannot write {tmp_path / 'train.log'}: {ENOSPC} (")
    assert err[0].endswith(" free on its file system); its log lines are lost")


# ---------------------------------------------------------------- killed data worker


def test_killed_data_worker_is_one_line_with_the_cause_and_the_resume_command(tmp_path):
    cfg_path, cfg = toy_run(tmp_path, "run", size=96, hooks=[
        {"name": "ToyEngineKillWorker", "epoch": 1, "inner_iter": 2}], epochs=2)
    cfg["dataloader"]["train"]["loader"] = {"num_workers": 1, "timeout": 1}  # polls each 1 s
    write_config(cfg, cfg_path)
    result = run_cli(cfg_path)
    out = str(tmp_path / "run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert re.fullmatch(re.escape("error: data-loader worker 0 (pid ") + r"\d+" + re.escape(
        f") was killed by SIGKILL; usually the out-of-memory killer: lower "
        f"dataloader.train.loader.num_workers or dataloader.train.sampler.batch_size; last "
        f"checkpoint {out}/checkpoints/epoch_1.pd; continue with: python {TRAIN} -c {cfg_path} "
        f"--resume auto"), last_line(result.stderr)), result.stderr[-2000:]
    assert checkpoint.load_checkpoint(os.path.join(out, "checkpoints", "latest.pd"))["epoch"] == 1


def test_a_dead_worker_is_named_by_index_pid_and_signal():
    class Worker:
        def __init__(self, pid, exitcode):
            self.pid, self.exitcode = pid, exitcode

    died = worker_death([Worker(17, None), Worker(4242, -signal.SIGKILL), Worker(9, -15)])
    assert str(died).startswith("data-loader worker 1 (pid 4242) was killed by SIGKILL; ")
    assert worker_death([Worker(17, None), Worker(18, 0)]) is None


# ---------------------------------------------------------------- several processes


@pytest.mark.slow
def test_a_dead_rank_stops_the_others_within_a_bounded_time(tmp_path):
    cfg_path, _ = toy_run(tmp_path, "run", size=256, batch_size=4, hooks=[
        {"name": "ToyEngineKill", "epoch": 1, "inner_iter": 3, "rank": 1}])
    result = launch(tmp_path, cfg_path, "log")  # a hang fails with TimeoutExpired
    assert result.returncode != 0
    # the launcher names the first failed rank it sees: the killed one (-9) or the survivor,
    # whose next collective aborted on the lost connection (-6)
    assert re.search(r"Container rank [01] status failed .* code -(9|6) ",
                     result.stdout + result.stderr)
    assert checkpoint.load_checkpoint(
        os.path.join(tmp_path, "run", "checkpoints", "latest.pd"))["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("what, failed, others", [
    ("checkpoint", "checkpoints/epoch_2.pd",
     "process 0 could not write {out}/checkpoints/epoch_2.pd (its log says why)"),
    ("metrics", "metrics.jsonl",
     "another process could not write its output (its log says why)"),
])
def test_full_disk_with_two_processes_stops_both_with_one_line_each(tmp_path, what, failed, others):
    """A checkpoint or a metrics.jsonl write failing on rank 0: both ranks stop together, each
    with one line, and no Paddle abort dump from a rank left waiting in a collective."""
    cfg_path, _ = toy_run(tmp_path, "run", batch_size=4,
                          hooks=[{"name": "ToyEngineDiskFull", "epoch": 1, "what": what}])
    result = launch(tmp_path, cfg_path, "log")
    out = str(tmp_path / "run")
    assert result.returncode == 2
    logs = [open(tmp_path / "log" / f"workerlog.{rank}").read() for rank in (0, 1)]
    assert all("Traceback" not in log and "Error Message Summary" not in log for log in logs)
    errors = [error_line(log) for log in logs]
    assert errors[0].startswith(f"error: cannot write {out}/{failed}: {ENOSPC} (")
    assert errors[1].startswith(f"error: {others.format(out=out)}; last checkpoint "
                                f"{out}/checkpoints/epoch_1.pd;")
    assert checkpoints_in(out) == ["epoch_1.pd", "latest.pd"]


@pytest.mark.slow
def test_two_process_swav_sigterm_to_one_rank_then_resume_matches_uninterrupted(tmp_path):
    """Ranks get the signal at different times (here only rank 1): both stop after the same
    step and write one checkpoint that holds both ranks' SwAV queues and RNG streams."""
    data = write_image_folder(tmp_path / "images", per_class=(16, 1))
    whole = write_config(tiny_swav_config(data, tmp_path / "whole"), tmp_path / "whole.yaml")
    stopped = write_config(tiny_swav_config(data, tmp_path / "stopped", hooks=[
        signal_hook(1, 3, "SIGTERM", rank=1)]), tmp_path / "stopped.yaml")
    assert launch(tmp_path, whole, "log_whole").returncode == 0
    first = launch(tmp_path, stopped, "log_stopped")
    assert first.returncode == STOPPED_STATUS
    for rank in (0, 1):
        log = open(tmp_path / "log_stopped" / f"workerlog.{rank}").read()
        assert "Traceback" not in log
        assert "stopped by SIGTERM after iteration 10; checkpoint " in log
    state = checkpoint.load_checkpoint(str(tmp_path / "stopped" / "checkpoints" / "latest.pd"))
    assert (state["epoch"], state["steps_in_epoch"], state["world_size"]) == (1, 4, 2)
    resumed = launch(tmp_path, stopped, "log_resumed", "--resume", "auto")
    assert resumed.returncode == 0, open(tmp_path / "log_resumed" / "workerlog.0").read()[-2000:]
    assert_same_two_process_swav_run(tmp_path / "whole", tmp_path / "stopped")
