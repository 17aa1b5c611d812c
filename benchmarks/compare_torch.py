"""PASSL-SwAV's training step against the PyTorch reference, on the same shapes.

    pip install torch==2.14.1 torchvision==0.29.1      # optional, not a project dependency
    python benchmarks/compare_torch.py [--rounds 3] [--batch-size 8] [--json]

The reference is what facebookresearch/swav trains, rebuilt here in PyTorch: torchvision's
resnet50 (fc removed), the projection head 2048 -> 2048 (BatchNorm, ReLU) -> 128, L2
normalisation, 3000 bias-free prototypes normalised before every step, one backbone call per
crop resolution, Sinkhorn-Knopp (3 iterations, eps 0.05) and the swapped loss (tau 0.1) in
float32, and apex LARC (trust 0.001, no clipping, weight decay 1e-6 inside the trust ratio)
around SGD momentum 0.9: the same update as our LARS. One process with PyTorch's default
threads (one per core), as the reference runs on one device.

Every variant runs in its own subprocess (so its peak RSS is its own), one after the other,
and the rounds alternate the variants (their order reversed every other round); the median
images/s of each is reported. Variants:

    passl         tools/benchmark.py train --nproc <cores> (the fast CPU layout: one process
                  per core, one thread each), batch split so the global batch is the same
    passl-1proc   tools/benchmark.py train, one process, one thread per core
    paddle-stock  the same step with Paddle out of the box: no MKL_DEBUG_CPU_TYPE, no
                  OMP_NUM_THREADS, Paddle's default thread count
    torch         the PyTorch reference above
    torch-cl      the same with channels-last tensors (not what the reference does)

The GFLOP/s of every variant use the FLOP count that ``tools/benchmark.py train`` reports (the
shapes are identical, so it needs at least one Paddle variant); % of peak needs
``--peak-gflops`` or measures it with ``--measure-peak``.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, "tools", "benchmark.py")
VARIANTS = ("passl", "passl-1proc", "paddle-stock", "torch", "torch-cl")
DEFAULT_VARIANTS = ("passl", "passl-1proc", "paddle-stock", "torch")
#: swav_r50_100ep.yaml's settings, which the reference shares
NMB_CROPS, SIZE_CROPS = (2, 6), (224, 96)
TEMPERATURE, EPSILON, SINKHORN_ITERATIONS, CROPS_FOR_ASSIGN = 0.1, 0.05, 3, (0, 1)
MOMENTUM, WEIGHT_DECAY, TRUST_COEFFICIENT, LARC_EPS = 0.9, 1e-6, 0.001, 1e-8


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (3)")
    parser.add_argument("--batch-size", type=int, default=8, help="global images per step (8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run (1)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--peak-gflops", type=float, help="the machine's FP32 peak, for %% of peak")
    parser.add_argument("--measure-peak", action="store_true",
                        help="measure the FP32 peak with large sgemms (numpy and paddle)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--worker", choices=("torch", "torch-cl"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- the PyTorch reference

def torch_step_runner(batch_size, channels_last):
    """``step() -> loss`` of the reference SwAV training step, on fixed random crops."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(0)
    backbone = torchvision.models.resnet50()
    backbone.fc = nn.Identity()
    head = nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                         nn.Linear(2048, 128))
    prototypes = nn.Linear(128, 3000, bias=False)
    model = nn.ModuleDict({"backbone": backbone, "head": head, "prototypes": prototypes}).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=MOMENTUM, weight_decay=0)
    resolutions = [(count, torch.randn(batch_size * count, 3, size, size)
                    .contiguous(memory_format=memory_format))
                   for count, size in zip(NMB_CROPS, SIZE_CROPS)]

    @torch.no_grad()
    def sinkhorn(scores):
        Q = torch.exp(scores / EPSILON).t()  # K x B, the paper's notation
        K, B = Q.shape
        Q /= Q.sum()
        for _ in range(SINKHORN_ITERATIONS):
            Q /= Q.sum(dim=1, keepdim=True)
            Q /= K
            Q /= Q.sum(dim=0, keepdim=True)
            Q /= B
        return (Q * B).t()

    def swapped_loss(scores):
        num_crops = sum(NMB_CROPS)
        loss = 0
        for crop_id in CROPS_FOR_ASSIGN:
            codes = sinkhorn(scores[batch_size * crop_id:batch_size * (crop_id + 1)].detach())
            subloss = 0
            for v in range(num_crops):
                if v != crop_id:
                    logits = scores[batch_size * v:batch_size * (v + 1)] / TEMPERATURE
                    subloss -= torch.mean(torch.sum(codes * F.log_softmax(logits, dim=1), dim=1))
            loss += subloss / (num_crops - 1)
        return loss / len(CROPS_FOR_ASSIGN)

    @torch.no_grad()
    def larc_then_sgd():
        """apex LARC, clip off: the decay goes inside the trust ratio, then plain SGD momentum."""
        for p in model.parameters():
            if p.grad is None:
                continue
            param_norm, grad_norm = torch.norm(p), torch.norm(p.grad)
            if param_norm != 0 and grad_norm != 0:
                ratio = TRUST_COEFFICIENT * param_norm / (
                    grad_norm + param_norm * WEIGHT_DECAY + LARC_EPS)
                p.grad += WEIGHT_DECAY * p
                p.grad *= ratio
        optimizer.step()

    def step():
        with torch.no_grad():
            w = prototypes.weight  # [K, 128]: prototypes are rows in PyTorch
            w.copy_(F.normalize(w, dim=1, p=2))
        features = torch.cat([backbone(crops) for _, crops in resolutions])
        embeddings = F.normalize(head(features), dim=1, p=2)
        loss = swapped_loss(prototypes(embeddings))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        larc_then_sgd()
        return loss.item()

    return step


def torch_worker(args):
    import torch

    step = torch_step_runner(args.batch_size, channels_last=args.worker == "torch-cl")
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({"images_per_s": args.batch_size / median, "step_s": median,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "nproc": 1, "threads": torch.get_num_threads()}))
    return 0


# ---------------------------------------------------------------------- running variants

def variant_command(name, args, cores):
    """(command, environment) of one variant's subprocess."""
    env = dict(os.environ)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--json"]
    if name == "passl":
        nproc = cores if args.batch_size % cores == 0 else 1
        return [sys.executable, BENCHMARK, "train", "--nproc", str(nproc),
                "--batch-size", str(args.batch_size // nproc), *common], env
    if name == "passl-1proc":
        return [sys.executable, BENCHMARK, "train", "--batch-size", str(args.batch_size),
                *common], env
    for key in ("MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS"):
        env.pop(key, None)
    if name == "paddle-stock":
        return [sys.executable, BENCHMARK, "train", "--stock-runtime",
                "--batch-size", str(args.batch_size), *common], env
    return [sys.executable, os.path.abspath(__file__), "--worker", name,
            "--batch-size", str(args.batch_size), *common], env


def run_variant(name, args, cores):
    command, env = variant_command(name, args, cores)
    completed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-3000:])
        raise SystemExit(f"error: variant {name} failed (exit code {completed.returncode})")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"  {name:<13} {result['images_per_s']:8.3f} images/s  step {result['step_s']:.2f} s  "
          f"peak RSS {result['peak_rss_mb']:.0f} MB  ({result['nproc']} x {result['threads']})",
          flush=True)
    return result


def measure_peak_gflops(size=4096, repeats=5):
    """Best FP32 GFLOP/s of a size x size sgemm in numpy and in paddle (with passl's settings)."""
    code = (
        "import time, numpy as np\n"
        "from passl.runtime import configure_cpu_threads; configure_cpu_threads()\n"
        "import paddle\n"
        f"n, best = {size}, 0.0\n"
        "a = np.random.rand(n, n).astype('float32'); b = np.random.rand(n, n).astype('float32')\n"
        "pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)\n"
        "for mm in (lambda: a @ b, lambda: paddle.matmul(pa, pb).numpy()):\n"
        "    mm()\n"
        f"    for _ in range({repeats}):\n"
        "        t = time.perf_counter(); mm(); best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)\n"
        "print(best)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def summarise(runs, gflop_per_image, peak):
    ips = statistics.median(r["images_per_s"] for r in runs)
    summary = {"images_per_s": round(ips, 3),
               "runs_images_per_s": [round(r["images_per_s"], 3) for r in runs],
               "gflops_per_s": round(ips * gflop_per_image, 1),
               "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
               "nproc": runs[0]["nproc"], "threads": runs[0]["threads"]}
    if peak:
        summary["percent_of_peak"] = round(100 * ips * gflop_per_image / peak, 1)
    return summary


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return torch_worker(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(VARIANTS)}")
    sys.path.insert(0, ROOT)
    from passl.runtime import available_cores

    cores = available_cores()
    peak = measure_peak_gflops() if args.measure_peak else args.peak_gflops
    if args.measure_peak:
        print(f"FP32 sgemm peak: {peak:.1f} GFLOP/s ({cores} cores)", flush=True)
    print(f"SwAV step: {NMB_CROPS[0]}x{SIZE_CROPS[0]} + {NMB_CROPS[1]}x{SIZE_CROPS[1]} crops, "
          f"global batch {args.batch_size}", flush=True)
    runs = {name: [] for name in variants}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", flush=True)
        order = variants if round_index % 2 == 0 else variants[::-1]
        for name in order:
            runs[name].append(run_variant(name, args, cores))
    # the shapes are the same in every variant, so Paddle's FLOP count holds for all
    gflop_per_image = next((r["train_gflop_per_image"] for name in variants for r in runs[name]
                            if "train_gflop_per_image" in r), float("nan"))
    print(f"{gflop_per_image} GFLOP per image per training step (tools/benchmark.py train's count)")
    results = {name: summarise(runs[name], gflop_per_image, peak) for name in variants}
    print(f"\n{'variant':<14} {'layout':>8} {'images/s':>9} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"{name:<14} {r['nproc']:>3} x {r['threads']:<2} {r['images_per_s']:>9.3f} "
              f"{r['gflops_per_s']:>8.1f} {r.get('percent_of_peak', float('nan')):>7.1f} "
              f"{r['peak_rss_mb']:>12.0f}")
    summary = {"batch_size": args.batch_size, "rounds": args.rounds,
               "train_gflop_per_image": gflop_per_image, "peak_gflops": peak, "variants": results}
    if "torch" in results:
        for name in ("passl", "passl-1proc", "paddle-stock"):
            if name in results:
                ratio = results[name]["images_per_s"] / results["torch"]["images_per_s"]
                summary[f"{name}_vs_torch"] = round(ratio, 3)
                print(f"{name} / torch: {ratio:.2f}x")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
