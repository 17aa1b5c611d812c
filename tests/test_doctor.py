"""tools/doctor.py: the line contract, the CPU checks, and the GPU lines on a faked GPU build."""
import io
import os
import re
import subprocess
import sys
import types

import paddle
import pytest

from passl import doctor
from passl.config import load_config
from passl.engine.amp import MixedPrecision
from toy_training import force_float16_scaler

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "tools", "doctor.py")
IMAGENET = os.path.join(os.path.dirname(HERE), "configs", "swav", "swav_r50_100ep.yaml")
LINE = re.compile(r"^.+?: .* \.\.\. (ok|FAILED: .+)$")


def lines_of(check, *args):
    out = io.StringIO()
    report = doctor.Report(out)
    check(report, *args)
    return out.getvalue().splitlines(), report.failed


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks a CPU-only Paddle build")
def test_gpus_on_a_cpu_build_fail_every_device_line_with_the_fix():
    result = run_tool("--gpus", "0,1")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert [line.split(":")[0] for line in lines] == [
        "paddle build", "cards", "/dev/shm", "SwAV step on gpu", "SwAV step on gpu",
        "save/resume round trip", "all-reduce across 2 ranks", "SyncBatchNorm on 2 ranks"]
    assert "CPU only (no CUDA) ... FAILED: install the paddlepaddle-gpu wheel" in lines[0]
    assert lines[3] == "SwAV step on gpu:0: not run ... FAILED: fix the lines above first"
    assert run_tool("--gpus", "0,0").stderr == (
        "error: --gpus 0,0: expected distinct card numbers such as 0,1\n")


def test_cpu_step_and_round_trip_are_ok_and_exact():
    cfg = load_config(IMAGENET)
    step_lines, failed = lines_of(doctor.check_step, cfg, "cpu")
    assert failed == 0 and re.match(r"SwAV step on cpu: amp off \(float32\), loss \d+\.\d{4}, "
                                    r"69 of 69 tensors updated \.\.\. ok$", step_lines[0])
    trip, failed = lines_of(doctor.check_round_trip, cfg, "cpu")
    assert failed == 0
    assert trip == ["save/resume round trip on cpu: amp off (float32): the step after resuming "
                    "differs by at most 0 (limit 0) ... ok"]


def test_round_trip_resumes_the_float16_scaler_and_names_it_when_it_cannot(monkeypatch):
    """On a GPU the ImageNet config trains with a float16 loss scaler: the round trip saves and
    resumes it (forced here on CPU); a scaler state Paddle cannot read back is named as the
    cause, not blamed on the installation."""
    force_float16_scaler(monkeypatch)
    cfg = load_config(IMAGENET)
    trip, failed = lines_of(doctor.check_round_trip, cfg, "cpu")
    assert failed == 0
    assert trip == ["save/resume round trip on cpu: amp float16 O1 with loss scaling: the step "
                    "after resuming differs by at most 0 (limit 0) ... ok"]
    # the scaler state as MixedPrecision saved it before: a 0-d scale, which
    # GradScaler.load_state_dict cannot index
    monkeypatch.setattr(MixedPrecision, "state_dict", lambda amp: amp.scaler.state_dict())
    monkeypatch.setattr(MixedPrecision, "set_state_dict",
                        lambda amp, state: amp.scaler.load_state_dict(state))
    trip, failed = lines_of(doctor.check_round_trip, cfg, "cpu")
    assert failed == 1
    assert trip == [f"save/resume round trip on cpu: resuming the AMP loss scaler (amp float16 O1 "
                    f"with loss scaling) failed: IndexError: too many indices for array: array "
                    f"is 0-dimensional, but 1 were indexed ... FAILED: PASSL cannot resume this "
                    f"state with Paddle {paddle.__version__}: report this line; reinstalling "
                    f"will not help"]


def test_dev_shm_line_uses_the_config_crops_and_fails_with_the_fix(monkeypatch):
    cfg = load_config(IMAGENET)
    assert doctor.multicrop_sample_bytes(cfg) == 2 * 3 * 224 ** 2 + 6 * 3 * 96 ** 2  # uint8
    stat = types.SimpleNamespace(f_frsize=2 ** 20, f_blocks=64, f_bavail=60)
    monkeypatch.setattr(os, "statvfs", lambda path: stat)
    lines, failed = lines_of(doctor.check_shared_memory, cfg, 8)
    assert failed == 1
    assert lines == ["/dev/shm: /dev/shm holds 64 MB but the train loader needs about 8.9 GB "
                     "(batch 128 x 0.45 MB per sample x 10 workers x prefetch 2 x 8 process(es)) "
                     "... FAILED: enlarge it (docker run --shm-size=12g, or mount -o remount,"
                     "size=... /dev/shm), or lower dataloader.train.loader.num_workers/"
                     "prefetch_factor, or set dataloader.train.loader.use_shared_memory=false"]


def test_gpu_build_and_cards_lines_from_what_paddle_reports(monkeypatch):
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.version, "cuda", lambda: "12.6")
    monkeypatch.setattr(paddle.version, "cudnn", lambda: "9.5.1")
    monkeypatch.setattr(paddle.version, "nccl", lambda: "2.21.5")
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 2)
    props = types.SimpleNamespace(name="NVIDIA A100-SXM4-40GB", total_memory=40 * 2 ** 30)
    monkeypatch.setattr(paddle.device.cuda, "get_device_properties", lambda gpu: props)
    build, _ = lines_of(doctor.check_build, [0, 1])
    assert build == [f"paddle build: paddle {paddle.__version__}, CUDA 12.6, cuDNN 9.5.1, "
                     f"NCCL 2.21.5 ... ok"]
    cards, failed = lines_of(doctor.check_cards, [0, 1])
    assert failed == 0 and cards == ["cards: 2 visible; gpu:0 NVIDIA A100-SXM4-40GB 40 GB; "
                                     "gpu:1 NVIDIA A100-SXM4-40GB 40 GB ... ok"]
    cards, failed = lines_of(doctor.check_cards, [0, 3])
    assert failed == 1 and cards[0].endswith("FAILED: card(s) [3] not visible: check nvidia-smi "
                                             "and CUDA_VISIBLE_DEVICES, or pass --gpus 0..1")


def test_one_card_skips_the_two_rank_checks_honestly():
    lines, failed = lines_of(doctor.check_collectives, [0])
    assert failed == 0
    assert lines == ["all-reduce across 2 ranks (NCCL): skipped: one card given ... ok",
                     "SyncBatchNorm on 2 ranks: skipped: one card given ... ok"]


def test_the_whole_cpu_run_is_ok_with_gloo():
    """What CI proves: every check of tools/doctor.py passes on CPU (about 5 s idle)."""
    result = run_tool()
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 7 and all(line.endswith("... ok") for line in lines), lines
    assert "all-reduce across 2 ranks (gloo): 1 + 2 = 3 on both ... ok" in lines
    assert lines[-1].startswith("SyncBatchNorm on 2 ranks: skipped on CPU")


def test_a_device_error_becomes_its_first_line_and_a_fix():
    detail, fix = doctor.failure(RuntimeError("ResourceExhaustedError: Out of memory on gpu:0\n"
                                              "  [Hint: ...]"))
    assert detail == "RuntimeError: ResourceExhaustedError: Out of memory on gpu:0"
    assert fix == "free the card (nvidia-smi lists the processes using it)"
    assert doctor.failure(OSError("libcudnn.so.9: cannot open"))[1] == doctor.REINSTALL
