"""A one-minute check that this machine can train: ``tools/doctor.py [-c CFG] [--gpus IDS]``.

Each check prints one line ending in ``ok`` or ``FAILED: <fix>``; the tool exits 0 only when
every check is ok. Without ``--gpus`` the same checks run on the CPU (gloo for the collectives),
which is how CI tests this module. The two-rank checks run in two processes started with
``paddle.distributed.launch``; each writes its findings to a JSON file the parent reads.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import paddle

from passl import distributed
from passl.data.device_input import loaders_need, shared_memory_status
from passl.engine import checkpoint
from passl.engine.amp import MixedPrecision
from passl.models import MODELS
from passl.solver.optimizers import build_optimizer

#: A SwAV small enough to step in a second on any device (2 crops of 32 px + 1 of 16 px).
TINY_SWAV = {
    "name": "SwAV",
    "backbone": {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 8,
                 "stem": "small"},
    "neck": {"name": "SwAVNeck", "in_dim": 64, "hidden_dim": 32, "out_dim": 16},
    "head": {"name": "SwAVPrototypes", "in_dim": 16, "num_prototypes": 8},
    "loss": {"name": "SwAVLoss", "nmb_crops": [2, 1], "crops_for_assign": [0, 1]},
}
TINY_BATCH, CROP_SIZES = 4, (32, 32, 16)
REINSTALL = ("install the paddlepaddle-gpu wheel built for your CUDA driver (see "
             "https://www.paddlepaddle.org.cn/install/quick) and check "
             "python -c 'import paddle; paddle.utils.run_check()'")
WORKER_TIMEOUT = 240


class Report:
    """Prints the check lines and remembers whether all were ok."""

    def __init__(self, out=sys.stdout):
        self.out, self.failed = out, 0

    def line(self, name, detail, fix=None):
        end = "ok" if fix is None else f"FAILED: {fix}"
        print(f"{name}: {detail} ... {end}", file=self.out, flush=True)
        self.failed += fix is not None


# ---------------------------------------------------------------- the machine

def check_build(report, gpus):
    version = paddle.__version__
    if paddle.is_compiled_with_cuda():
        detail = (f"paddle {version}, CUDA {paddle.version.cuda()}, cuDNN "
                  f"{paddle.version.cudnn()}, NCCL {paddle.version.nccl()}")
        return report.line("paddle build", detail)
    detail = f"paddle {version}, CPU only (no CUDA)"
    report.line("paddle build", detail, REINSTALL if gpus else None)


def check_cards(report, gpus):
    if not gpus:
        return report.line("cards", "none asked for (CPU run; pass --gpus 0,1 to check cards)")
    if not paddle.is_compiled_with_cuda():
        return report.line("cards", f"--gpus {','.join(map(str, gpus))}",
                           "needs a GPU build of Paddle (see the paddle build line)")
    count = paddle.device.cuda.device_count()
    missing = [g for g in gpus if g >= count]
    if missing:
        return report.line("cards", f"{count} visible", f"card(s) {missing} not visible: check "
                           f"nvidia-smi and CUDA_VISIBLE_DEVICES, or pass --gpus 0..{count - 1}")
    cards = []
    for gpu in gpus:
        props = paddle.device.cuda.get_device_properties(gpu)
        cards.append(f"gpu:{gpu} {props.name} {props.total_memory / 2 ** 30:.0f} GB")
    report.line("cards", f"{count} visible; " + "; ".join(cards))


def multicrop_sample_bytes(cfg):
    """Bytes of one image's crops as the config's MultiCrop ships them, None without one."""
    train = (cfg.get("dataloader") or {}).get("train") or {}
    for block in (train.get("dataset") or {}).get("transforms") or []:
        if isinstance(block, dict) and block.get("name") == "MultiCrop":
            per_value = 1 if block.get("normalize_on_device", False) else 4
            sizes = zip(block.get("nmb_crops", (2, 6)), block.get("size_crops", (224, 96)))
            return sum(count * 3 * size * size * per_value for count, size in sizes)
    return None


def check_shared_memory(report, cfg, processes):
    train = (cfg.get("dataloader") or {}).get("train") or {}
    loader, sampler = train.get("loader") or {}, train.get("sampler") or {}
    sample = multicrop_sample_bytes(cfg)
    if sample is None or not loader.get("num_workers") or not loader.get("use_shared_memory",
                                                                          True):
        return report.line("/dev/shm", "the config's train loader uses none (no MultiCrop "
                           "workers with shared memory)")
    need, how = loaders_need(sample, sampler.get("batch_size", 1), loader["num_workers"],
                             loader.get("prefetch_factor", 2), processes)
    level, message = shared_memory_status(need, how)
    if level is None:
        return report.line("/dev/shm", "not on this system (nothing to check)")
    if level == "ok":
        return report.line("/dev/shm", message.split(": ", 1)[1])
    detail, fix = message.split("; ", 1)
    report.line("/dev/shm", detail, fix)


# ---------------------------------------------------------------- one device

def failure(error):
    """``(detail, fix)`` for an exception raised by Paddle on the device."""
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    memory = "out of memory" in str(error).lower() or "resourceexhausted" in str(error).lower()
    fix = "free the card (nvidia-smi lists the processes using it)" if memory else REINSTALL
    return f"{type(error).__name__}: {text}", fix


def tiny_batch(seed=0):
    rng = np.random.RandomState(seed)
    crops = [paddle.to_tensor(rng.randn(TINY_BATCH, 3, s, s).astype("float32"))
             for s in CROP_SIZES]
    return crops, paddle.full([TINY_BATCH], -1, dtype="int64")


def tiny_run(cfg, device):
    """``(model, optimizer, amp, step)``: the tiny SwAV with the config's optimizer and AMP."""
    paddle.seed(0)
    model = MODELS.build(TINY_SWAV)
    optimizer = build_optimizer(cfg.get("optimizer") or {"name": "LARS"}, model, 0.1)
    amp = MixedPrecision(cfg.get("amp"), device)

    def step(batch):
        with amp.autocast():
            loss = model(batch)["loss"]
        amp.backward(loss)
        amp.step(optimizer)
        optimizer.clear_grad(set_to_zero=False)
        return float(loss)
    return model, optimizer, amp, step


def check_step(report, cfg, place):
    """One SwAV step on ``place`` under the config's AMP: a finite loss that moves weights."""
    name = f"SwAV step on {place}"
    try:
        paddle.set_device(place)
        model, _, amp, step = tiny_run(cfg, "cpu" if place == "cpu" else "gpu")
        before = [p.numpy().copy() for p in model.parameters()]
        loss = step(tiny_batch())
    except Exception as e:  # any failure of the device stack is the finding
        return report.line(name, *failure(e))
    moved = sum(not np.array_equal(b, p.numpy()) for b, p in zip(before, model.parameters()))
    detail = f"amp {amp.describe()}, loss {loss:.4f}, {moved} of {len(before)} tensors updated"
    if not np.isfinite(loss) or not moved:
        return report.line(name, detail, "a non-finite loss or no update: try amp.enable=false "
                           "and report the Paddle/CUDA versions above")
    report.line(name, detail)


def check_round_trip(report, cfg, place):
    """Save a stepped run, resume it in fresh objects: same state, then the same next step."""
    name = f"save/resume round trip on {place}"
    try:
        worst = resumed_step_gap(cfg, place)
    except Exception as e:  # as in check_step
        return report.line(name, *failure(e))
    # bit-identical on CPU; cuDNN may pick other algorithms in the new objects (deterministic:
    # true pins them), so a GPU gets float32 rounding room
    limit = 0.0 if place == "cpu" else 1e-4
    detail = f"the step after resuming differs by at most {worst:.3g} (limit {limit:g})"
    report.line(name, detail, None if worst <= limit else
                "resumed state differs: check that the file system keeps the whole file and "
                "report the Paddle version")


def resumed_step_gap(cfg, place):
    """Largest parameter difference between a run and its resumed copy after one more step."""
    paddle.set_device(place)
    device = "cpu" if place == "cpu" else "gpu"
    model, optimizer, amp, step = tiny_run(cfg, device)
    step(tiny_batch(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "epoch_1.pd")
        checkpoint.write_atomic({"kind": checkpoint.KIND, "version": checkpoint.VERSION,
                                 "epoch": 1, "iter": 1, "lr_scheduler": {}, "per_rank": [],
                                 "model": model.state_dict(),
                                 "optimizer": checkpoint.optimizer_state(optimizer, model),
                                 "amp_scaler": amp.state_dict(), "rng": checkpoint.rng_state()},
                                path)
        state = checkpoint.load_checkpoint(path)
    resumed, resumed_optimizer, resumed_amp, resumed_step = tiny_run(cfg, device)
    resumed.set_state_dict(state["model"])
    checkpoint.load_optimizer_state(resumed_optimizer, resumed, state["optimizer"])
    resumed_amp.set_state_dict(state["amp_scaler"])
    step(tiny_batch(1))
    checkpoint.set_rng_state(state["rng"])
    resumed_step(tiny_batch(1))
    return max(float(np.abs(a.numpy() - b.numpy()).max())
               for a, b in zip(model.parameters(), resumed.parameters()))


# ---------------------------------------------------------------- two ranks

def collective_worker(out_dir):
    """One rank of the two-rank checks (started by the launcher): all-reduce, SyncBatchNorm."""
    on_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if on_gpu:  # before joining, as the trainer does (NCCL binds to the current card)
        paddle.set_device(f"gpu:{paddle.distributed.ParallelEnv().device_id}")
    distributed.init_process_group()
    rank = distributed.get_rank()
    result = {"rank": rank, "world": distributed.get_world_size(),
              "all_reduce": distributed.all_reduce(paddle.to_tensor([rank + 1.0]))
              .numpy().tolist()}
    if on_gpu:
        result["sync_bn"] = sync_bn_error(rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def sync_bn_error(rank):
    """Largest gap between SyncBatchNorm's running mean and the mean over both ranks' data."""
    data = [np.random.RandomState(r).randn(4, 3, 2, 2).astype("float32") + r for r in (0, 1)]
    layer = paddle.nn.SyncBatchNorm(3, momentum=0.0)  # running mean = this batch's mean
    layer.train()
    layer(paddle.to_tensor(data[rank]))
    expected = np.concatenate(data).mean(axis=(0, 2, 3))
    return float(np.abs(layer._mean.numpy() - expected).max())


def run_collectives(gpus, timeout=WORKER_TIMEOUT):
    """Launch the two ranks; ``(results by rank, log tail)``."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "tools", "doctor.py")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir",
                   os.path.join(tmp, "logs")]
        command += ["--gpus", ",".join(map(str, gpus[:2]))] if gpus else ["--nproc_per_node", "2"]
        try:
            done = subprocess.run(command + [script, "--worker", tmp], capture_output=True,
                                  text=True, timeout=timeout)
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        except subprocess.TimeoutExpired:
            tail = [f"no answer within {timeout} s"]
        results = {}
        for rank in (0, 1):
            path = os.path.join(tmp, f"rank{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[rank] = json.load(f)
        return results, tail[0][:200]


def check_collectives(report, gpus):
    backend = "NCCL" if gpus else "gloo"
    if gpus and len(gpus) < 2:
        report.line(f"all-reduce across 2 ranks ({backend})", "skipped: one card given")
        return report.line("SyncBatchNorm on 2 ranks", "skipped: one card given")
    results, tail = run_collectives(gpus)
    fix = ("the two ranks did not finish: check that the cards can talk (nvidia-smi topo -m; "
           "NCCL_DEBUG=INFO; NCCL_P2P_DISABLE=1 on machines without peer-to-peer) and that "
           "no firewall blocks localhost ports")
    if len(results) != 2:
        report.line(f"all-reduce across 2 ranks ({backend})", f"launcher: {tail}", fix)
        return report.line("SyncBatchNorm on 2 ranks", "not run", "fix the all-reduce first")
    sums = [results[r]["all_reduce"] for r in (0, 1)]
    report.line(f"all-reduce across 2 ranks ({backend})", f"1 + 2 = {sums[0][0]:g} on both",
                None if sums == [[3.0], [3.0]] else fix)
    if not gpus:
        return report.line("SyncBatchNorm on 2 ranks", "skipped on CPU (Paddle has no CPU "
                           "kernel; CPU training keeps per-process BatchNorm)")
    gap = max(results[r]["sync_bn"] for r in (0, 1))
    report.line("SyncBatchNorm on 2 ranks", f"running mean off the 2-rank mean by {gap:.2g}",
                None if gap < 1e-5 else "SyncBatchNorm did not see the other rank: " + fix)


def run(cfg, gpus, out=sys.stdout):
    """All checks in order; returns the number that failed."""
    report = Report(out)
    check_build(report, gpus)
    check_cards(report, gpus)
    usable = not gpus or report.failed == 0  # the device checks need the build and the cards
    check_shared_memory(report, cfg, max(1, len(gpus)))
    places = [f"gpu:{g}" for g in gpus] or ["cpu"]
    for place in places:
        if usable:
            check_step(report, cfg, place)
        else:
            report.line(f"SwAV step on {place}", "not run", "fix the lines above first")
    if usable:
        check_round_trip(report, cfg, places[0])
        check_collectives(report, gpus)
    else:
        for name in ("save/resume round trip", "all-reduce across 2 ranks",
                     "SyncBatchNorm on 2 ranks"):
            report.line(name, "not run", "fix the lines above first")
    return report.failed
