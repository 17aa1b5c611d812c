"""``tools/benchmark.py infer``: ResNet feature extraction images/s, Paddle vs PyTorch.

One forward pass of the backbone (pooled features, eval mode, no gradients) on a fixed
random batch, in every variant of one run (the machine is shared: only ratios measured side
by side mean something). Paddle variants run in this process:

    paddle-dygraph             the backbone layer under paddle.no_grad()
    paddle-inference           paddle.jit.save + Paddle Inference, plain CPU kernels
    paddle-inference-onednn    the same with oneDNN (float32)
    paddle-inference-bf16      oneDNN bfloat16 (only on CPUs with AVX512-BF16; not exact)
    onnxruntime                the same graph converted by paddle2onnx, run by onnxruntime
                               (only with the ``[onnx]`` extra; skipped with a note otherwise)

PyTorch variants (``benchmarks/torch_infer_worker.py``: eager, channels-last,
traced+frozen) run in a subprocess of ``--torch-python`` (default: this interpreter) and
are skipped, with a note, when that Python has no torch. Rounds alternate Paddle and
PyTorch (order reversed every other round); each variant reports the median step.

Every Paddle and ONNX variant's output is compared with dygraph (max relative difference,
``relative_difference``: 0 for dygraph itself, null for PyTorch, which runs its own random
weights); a float32 variant within ``EXACT`` counts as exact. JSON (last line): ``images_per_s``
of the fastest exact float32 Paddle variant, named in ``variant``; ``baseline_images_per_s`` of PyTorch eager
(``paddle-dygraph`` when torch is absent, named in ``baseline``) and ``ratio`` between them;
``vs_torch_best`` against PyTorch's fastest float32 variant; ``variants`` with every number.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_WORKER = os.path.join(ROOT, "benchmarks", "torch_infer_worker.py")
PADDLE_VARIANTS = ("paddle-dygraph", "paddle-inference", "paddle-inference-onednn",
                   "paddle-inference-bf16")
#: relative difference to dygraph below which a float32 variant counts as exact
EXACT = 1e-5
# a torch worker that does not answer in this many seconds is reported as failed
TORCH_TIMEOUT_S = 1800


def add_arguments(parser):
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward (16)")
    parser.add_argument("--image-size", type=int, default=224, help="square input side (224)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every variant (2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (2)")
    parser.add_argument("--steps", type=int, default=3, help="timed forwards per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards first (1)")
    parser.add_argument("--torch-python", default=sys.executable, metavar="PYTHON",
                        help="interpreter with torch for the PyTorch variants (default: this "
                             "one); 'none' skips them")
    size = parser.add_argument_group("model size (default ResNet-50, ImageNet stem)")
    size.add_argument("--depth", type=int, default=50)
    size.add_argument("--layers", type=int, nargs=4, help="residual blocks per stage")
    size.add_argument("--base-width", type=int, default=64)
    size.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar", "small"))


def _backbone_options(args):
    block = {"depth": args.depth, "base_width": args.base_width, "stem": args.stem}
    if args.layers:
        block["layers"] = list(args.layers)
    return block


# ---------------------------------------------------------------------- Paddle side

def paddle_runners(args):
    """``{variant: run(images) -> features}`` over one randomly initialised backbone."""
    import paddle
    from passl.deploy.engine import cpu_supports_bfloat16, save_static, InferenceEngine
    from passl.models.registry import BACKBONES

    paddle.seed(0)
    backbone = BACKBONES.build({"name": "ResNet", **_backbone_options(args)})
    backbone.eval()

    def dygraph(batch):
        with paddle.no_grad():
            return backbone(paddle.to_tensor(batch)).numpy()

    runners = {"paddle-dygraph": dygraph}
    options = {"paddle-inference": {"onednn": False},
               "paddle-inference-onednn": {"onednn": True}}
    if cpu_supports_bfloat16():
        options["paddle-inference-bf16"] = {"onednn": True, "precision": "bfloat16"}
    with tempfile.TemporaryDirectory(prefix="passl-bench-infer-") as directory:
        graph, params = save_static(backbone, os.path.join(directory, "model"),
                                    [-1, 3, args.image_size, args.image_size])
        for name, extra in options.items():  # each predictor reads the files when created
            runners[name] = InferenceEngine(graph, params, device="cpu", threads=args.threads,
                                            **extra)
        onnx_runner = onnx_runtime_runner(graph, params, directory, args.threads)
        if onnx_runner:
            runners["onnxruntime"] = onnx_runner
    return runners


def onnx_runtime_runner(graph, params, directory, threads):
    """The onnxruntime variant, or None (with a note) without the ``[onnx]`` extra."""
    from passl.deploy.onnx_runtime import OnnxEngine, paddle_to_onnx, require
    from passl.errors import UserError
    try:
        require("paddle2onnx", "the onnxruntime variant")
        require("onnxruntime", "the onnxruntime variant")
    except UserError as missing:
        print(f"onnxruntime variant skipped: {missing}", flush=True)
        return None
    path = paddle_to_onnx(graph, params, os.path.join(directory, "model.onnx"))
    return OnnxEngine(path, device="cpu", threads=threads)


def relative_difference(actual, expected):
    import numpy as np
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-12))


def time_runner(run, images, steps, warmup):
    for _ in range(warmup):
        run(images)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------- PyTorch side

def torch_available(python):
    if python == "none":
        return False
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=300)
    return probe.returncode == 0


def run_torch(args):
    """One round of the PyTorch variants in a subprocess: ``{variant: step seconds}``."""
    command = [args.torch_python, TORCH_WORKER, "--depth", str(args.depth),
               "--base-width", str(args.base_width), "--stem", args.stem,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    if args.layers:
        command += ["--layers", *map(str, args.layers)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=TORCH_TIMEOUT_S)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-2000:])
        raise SystemExit(f"error: the PyTorch worker failed (exit code {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: value["step_s"] for name, value in result.items() if isinstance(value, dict)}


# ---------------------------------------------------------------------- the run

def summarise(steps, errors, batch_size):
    """Per variant: median images/s over rounds, relative difference to dygraph."""
    variants = {}
    for name, times in steps.items():
        entry = {"images_per_s": round(batch_size / statistics.median(times), 3),
                 "rounds_images_per_s": [round(batch_size / t, 3) for t in times]}
        entry["relative_difference"] = errors.get(name)
        variants[name] = entry
    return variants


def headline(variants):
    """The JSON contract keys from the per-variant numbers (see module docstring)."""
    exact = {name: v for name, v in variants.items()
             if name.startswith("paddle") and "bf16" not in name
             and (v.get("relative_difference") or 0.0) <= EXACT}
    best = max(exact, key=lambda name: exact[name]["images_per_s"])
    baseline = "torch-eager" if "torch-eager" in variants else "paddle-dygraph"
    summary = {"images_per_s": variants[best]["images_per_s"], "variant": best,
               "baseline": baseline,
               "baseline_images_per_s": variants[baseline]["images_per_s"]}
    summary["ratio"] = round(summary["images_per_s"] / summary["baseline_images_per_s"], 3)
    torch_variants = [name for name in variants if name.startswith("torch")]
    if torch_variants:
        torch_best = max(torch_variants, key=lambda name: variants[name]["images_per_s"])
        summary["torch_best_variant"] = torch_best
        summary["vs_torch_best"] = round(
            summary["images_per_s"] / variants[torch_best]["images_per_s"], 3)
    return summary


def main(args):
    import numpy as np
    from passl.runtime import configure_cpu_threads
    configure_cpu_threads(args.threads)

    images = np.random.default_rng(0).standard_normal(
        (args.batch_size, 3, args.image_size, args.image_size)).astype("float32")
    runners = paddle_runners(args)
    reference = runners["paddle-dygraph"](images)
    errors = {name: relative_difference(run(images), reference)
              for name, run in runners.items()}
    with_torch = torch_available(args.torch_python)
    if not with_torch:
        print(f"PyTorch variants skipped: no torch in {args.torch_python} "
              f"(pass --torch-python PATH)", flush=True)
    print(f"ResNet-{args.depth} features, batch {args.batch_size} at {args.image_size} px, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps", flush=True)
    steps = {name: [] for name in runners}
    for round_index in range(args.rounds):
        sides = ["paddle", "torch"] if round_index % 2 == 0 else ["torch", "paddle"]
        for side in sides:
            if side == "paddle":
                for name, run in runners.items():
                    steps[name].append(time_runner(run, images, args.steps, args.warmup))
            elif with_torch:
                for name, step in run_torch(args).items():
                    steps.setdefault(name, []).append(step)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {args.batch_size / times[-1]:.1f}" for name, times in steps.items()),
            flush=True)
    variants = summarise(steps, errors, args.batch_size)
    summary = headline(variants)
    print(f"\n{'variant':<26} {'images/s':>9} {'vs ' + summary['baseline']:>18} "
          f"{'rel. diff':>10}")
    for name, v in variants.items():
        ratio = v["images_per_s"] / summary["baseline_images_per_s"]
        diff = v.get("relative_difference")
        print(f"{name:<26} {v['images_per_s']:>9.2f} {ratio:>17.2f}x "
              f"{'' if diff is None else format(diff, '.1e'):>10}")
    print(f"fastest exact float32: {summary['variant']} = {summary['ratio']:.2f}x "
          f"{summary['baseline']}" + (f", {summary['vs_torch_best']:.2f}x "
                                      f"{summary['torch_best_variant']}"
                                      if "vs_torch_best" in summary else ""))
    if args.json:
        print(json.dumps({**summary, "batch_size": args.batch_size,
                          "image_size": args.image_size, "threads": args.threads,
                          "rounds": args.rounds, "variants": variants}))
    return 0
