"""``tools/benchmark.py train``: images/s and GFLOP/s of the real SwAV training step.

One step is what the trainer runs: the SwAV model's multi-crop forward (prototypes
normalised, backbone per resolution, neck, prototypes, Sinkhorn and the swapped loss),
``backward()``, the config's optimizer step (LARS) and ``clear_grad``. The model and
optimizer come from the config (default ``configs/swav/swav_r50_100ep.yaml``: ResNet-50,
2x224 + 6x96 crops, K = 3000), in float32, with synthetic crops of the config's sizes;
``--with-data`` feeds it real JPEGs through ``build_dataloader`` instead, and the time of
a step then includes waiting for its batch. Steps are timed after ``--warmup`` steps and
the median is reported.

FLOPs are counted, not estimated: one forward pass records every Conv2D and Linear that
runs with its output shape, a multiply-add is 2 FLOPs, and the backward pass costs one
forward for the weight gradients plus one for the input gradients, except for layers whose
input needs no gradient (the first convolution sees the images). That is the usual
"training = 3 x forward" rule, minus the first convolution's input gradient. Other ops
(BatchNorm, ReLU, pooling, Sinkhorn, the optimizer) are not counted.

``--nproc N`` starts N data-parallel processes with ``paddle.distributed.launch`` (gloo on
CPU), each with ``--batch-size`` images per step, and reports their total images/s.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "swav", "swav_r50_100ep.yaml")
#: backbone keys that ``--depth`` etc. override (CI-sized runs)
BACKBONE_OPTIONS = ("depth", "layers", "base_width", "stem", "data_format")


def add_arguments(parser):
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help="config whose model, optimizer and MultiCrop crops are timed "
                             "(default configs/swav/swav_r50_100ep.yaml)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per process per step (8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes started with paddle.distributed.launch (1)")
    parser.add_argument("--threads", default="auto",
                        help="CPU threads per process ('auto' = cores / processes)")
    parser.add_argument("--with-data", action="store_true",
                        help="feed the step from build_dataloader over generated JPEGs")
    parser.add_argument("--workers", type=int, default=0,
                        help="loader worker processes with --with-data (0: in the main process)")
    parser.add_argument("--stock-runtime", action="store_true",
                        help="skip passl.runtime's CPU settings: Paddle out of the box")
    size = parser.add_argument_group("model size (CI-sized runs); default: the config's")
    size.add_argument("--depth", type=int)
    size.add_argument("--layers", type=int, nargs=4, help="residual blocks per stage")
    size.add_argument("--base-width", type=int)
    size.add_argument("--stem", choices=("imagenet", "cifar", "small"))
    size.add_argument("--data-format", choices=("NCHW", "NHWC"))
    size.add_argument("--hidden-dim", type=int, help="neck hidden width (0: one Linear)")
    size.add_argument("--num-prototypes", type=int, help="K")
    size.add_argument("--nmb-crops", type=int, nargs="+", help="crops per resolution, e.g. 2 6")
    size.add_argument("--size-crops", type=int, nargs="+", help="crop sizes, e.g. 224 96")
    # internal: how the --nproc parent passes the photos to, and gets the result from, rank 0
    parser.add_argument("--photos-root", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)


# ---------------------------------------------------------------------- FLOPs

def count_macs(model, run_forward):
    """Multiply-adds of the Conv2D and Linear layers in one call of ``run_forward()``.

    Returns ``(forward, backward)``: backward is weight gradients (= forward) plus input
    gradients (= forward) for the layers whose input needs a gradient.
    """
    import numpy as np
    import paddle.nn as nn

    forward, backward = [0], [0]

    def record(layer, inputs, output):
        if isinstance(layer, nn.Conv2D):
            kernel_volume = int(np.prod(layer.weight.shape[1:]))  # in/groups x kh x kw
        else:
            kernel_volume = layer.weight.shape[0]  # Linear weight is [in, out]
        macs = int(np.prod(output.shape)) * kernel_volume
        forward[0] += macs
        backward[0] += macs * (1 if inputs[0].stop_gradient else 2)

    handles = [layer.register_forward_post_hook(record) for layer in model.sublayers()
               if isinstance(layer, (nn.Conv2D, nn.Linear))]
    try:
        run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return forward[0], backward[0]


# ---------------------------------------------------------------------- setup

def load_setup(args):
    """(model block, optimizer block, MultiCrop block) of the config with the size options."""
    from passl.config import load_config, to_plain
    from passl.errors import ConfigError

    cfg = to_plain(load_config(args.config))
    model, optimizer = cfg.get("model"), cfg.get("optimizer")
    if not model or model.get("name") != "SwAV" or not optimizer:
        raise ConfigError(f"{args.config}: the train benchmark needs a SwAV `model` block and an "
                          f"`optimizer` block")
    multicrop = multicrop_block(cfg, args.config)
    backbone = model["backbone"]
    for key in BACKBONE_OPTIONS:
        if getattr(args, key) is not None:
            backbone[key] = getattr(args, key)
    if any(getattr(args, key) is not None for key in BACKBONE_OPTIONS[:3]):
        model["neck"]["in_dim"] = resnet_out_channels(backbone)
    if args.hidden_dim is not None:
        model["neck"]["hidden_dim"] = args.hidden_dim
    if args.num_prototypes is not None:
        model["head"]["num_prototypes"] = args.num_prototypes
    if args.nmb_crops or args.size_crops:
        multicrop = resized_multicrop(multicrop, args.nmb_crops or multicrop["nmb_crops"],
                                      args.size_crops or multicrop["size_crops"])
    model["loss"]["nmb_crops"] = list(multicrop["nmb_crops"])
    return model, optimizer, multicrop


def multicrop_block(cfg, path):
    from passl.errors import ConfigError

    transforms = cfg.get("dataloader", {}).get("train", {}).get("dataset", {}).get("transforms", [])
    for block in transforms:
        if block.get("name") == "MultiCrop":
            return dict(block)
    raise ConfigError(f"{path}: dataloader.train.dataset.transforms has no MultiCrop block; the "
                      f"train benchmark takes the crop sizes from it")


def resized_multicrop(multicrop, nmb_crops, size_crops):
    """MultiCrop with other crop counts/sizes; the scale ranges of the first resolutions kept."""
    from passl.errors import UserError

    if len(nmb_crops) != len(size_crops):
        raise UserError(f"--nmb-crops {nmb_crops} and --size-crops {size_crops} must have the "
                        f"same length")
    scales = list(zip(multicrop["min_scale_crops"], multicrop["max_scale_crops"]))
    scales += [scales[-1]] * (len(size_crops) - len(scales))
    return {"name": "MultiCrop", "nmb_crops": list(nmb_crops), "size_crops": list(size_crops),
            "min_scale_crops": [low for low, _ in scales[:len(size_crops)]],
            "max_scale_crops": [high for _, high in scales[:len(size_crops)]],
            "normalize_on_device": multicrop.get("normalize_on_device", False)}


def resnet_out_channels(backbone):
    from passl.models.backbones.resnet import DEPTHS

    block = DEPTHS[backbone.get("depth", 50)][0]
    return backbone.get("base_width", 64) * backbone.get("width_multiplier", 1) * 8 * block.expansion


def synthetic_batches(multicrop, batch_size):
    """An endless iterator of one fixed ``(crops, labels)`` batch (seeded noise)."""
    import paddle

    paddle.seed(0)
    crops = [paddle.randn([batch_size, 3, size, size])
             for count, size in zip(multicrop["nmb_crops"], multicrop["size_crops"])
             for _ in range(count)]
    labels = paddle.full([batch_size], -1, dtype="int64")
    while True:
        yield crops, labels


def data_batches(multicrop, batch_size, photos_root, workers):
    """``(crops, labels)`` from build_dataloader over the JPEGs in ``photos_root``, endlessly
    (normalised on the device as the trainer does when the MultiCrop ships uint8)."""
    from passl.data import build_dataloader, set_loader_epoch
    from passl.data.device_input import batch_normalizer

    loader = build_dataloader({"dataset": {"name": "ImageFolder", "root": photos_root,
                                           "transforms": [multicrop]},
                               "sampler": {"batch_size": batch_size, "shuffle": True,
                                           "drop_last": True},
                               "loader": {"num_workers": workers}}, mode="train")
    normalize = batch_normalizer(loader)
    epoch = 0
    while True:
        set_loader_epoch(loader, epoch)
        yield from (normalize(batch) for batch in loader)
        epoch += 1


# ---------------------------------------------------------------------- measuring

def measure(args, photos_root=None):
    """Run warm-up and timed steps in this process (one rank of ``--nproc``); rank 0 returns
    the result dict, other ranks None."""
    threads = None
    if not args.stock_runtime:
        from passl.runtime import configure_cpu_threads
        threads = configure_cpu_threads(int(args.threads) if args.threads != "auto" else "auto")
    import paddle

    from passl import distributed
    from passl.models import MODELS
    from passl.solver.optimizers import build_optimizer

    paddle.set_device("cpu")
    world_size = distributed.init_process_group()
    model_cfg, optimizer_cfg, multicrop = load_setup(args)
    paddle.seed(0)
    model = MODELS.build(model_cfg)
    model.train()
    optimizer = build_optimizer(optimizer_cfg, model, 0.1)
    wrapped = paddle.DataParallel(model) if world_size > 1 else model
    batches = (data_batches(multicrop, args.batch_size, photos_root, args.workers)
               if args.with_data else synthetic_batches(multicrop, args.batch_size))

    def step():
        loss = wrapped(next(batches))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad(set_to_zero=False)
        return float(loss)

    forward_macs, backward_macs = count_macs(model, step)  # the first warm-up step
    times, losses = [], []
    for index in range(args.warmup + args.steps - 1):
        start = time.perf_counter()
        losses.append(step())
        if index >= args.warmup - 1:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    per_rank = distributed.all_gather_object(
        {"median_s": median, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    if distributed.get_rank() != 0:
        return None
    slowest = max(rank["median_s"] for rank in per_rank)
    images_per_step = args.batch_size * world_size
    train_flops = 2 * (forward_macs + backward_macs) * world_size
    return {
        "benchmark": "train",
        "images_per_s": round(images_per_step / slowest, 3),
        "gflops_per_s": round(train_flops / slowest / 1e9, 2),
        "peak_rss_mb": round(sum(rank["peak_rss_mb"] for rank in per_rank), 1),
        "peak_rss_mb_per_process": [round(rank["peak_rss_mb"], 1) for rank in per_rank],
        "nproc": world_size,
        "threads": threads["threads"] if threads else  # Paddle's own default otherwise
        paddle.get_flags(["FLAGS_paddle_num_threads"])["FLAGS_paddle_num_threads"],
        "step_s": round(slowest, 4),
        "step_times_s": [round(t, 4) for t in times],
        "batch_size": args.batch_size,
        "crops": "+".join(f"{n}x{s}" for n, s in zip(multicrop["nmb_crops"], multicrop["size_crops"])),
        "backbone": model_cfg["backbone"],
        "num_prototypes": model_cfg["head"]["num_prototypes"],
        "optimizer": optimizer_cfg["name"],
        "forward_gflop_per_image": round(2 * forward_macs / args.batch_size / 1e9, 4),
        "train_gflop_per_image": round(2 * (forward_macs + backward_macs) / args.batch_size / 1e9, 4),
        "flop_rule": "conv+linear: 2 FLOP per multiply-add; backward = weight grads + input "
                     "grads (none for the first conv)",
        "with_data": bool(args.with_data),
        "losses_finite": all(loss == loss and abs(loss) != float("inf") for loss in losses),
        "MKL_DEBUG_CPU_TYPE": os.environ.get("MKL_DEBUG_CPU_TYPE"),
    }


def launch(args, photos_root):
    """Run this benchmark in ``args.nproc`` processes under paddle.distributed.launch."""
    with tempfile.TemporaryDirectory(prefix="passl_bench_train_") as tmp:
        result_file = os.path.join(tmp, "result.json")
        argv = [a for a in sys.argv[1:] if a != "--json"]
        if photos_root:
            argv += ["--photos-root", photos_root]
        command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                   str(args.nproc), "--log_dir", os.path.join(tmp, "log"),
                   os.path.join(ROOT, "tools", "benchmark.py"), *argv, "--result-file", result_file]
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if completed.returncode != 0 or not os.path.exists(result_file):
            sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
            logs = os.path.join(tmp, "log")
            for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
                with open(os.path.join(logs, name), errors="replace") as f:
                    sys.stderr.write(f"--- {name}\n{f.read()[-3000:]}")
            raise SystemExit(f"error: the {args.nproc} benchmark processes failed "
                             f"(exit code {completed.returncode})")
        with open(result_file) as f:
            return json.load(f)


def print_table(result):
    print(f"SwAV training step, {result['crops']} crops, batch {result['batch_size']} per process, "
          f"{result['nproc']} process(es) x {result['threads']} thread(s), "
          f"{'real JPEGs through build_dataloader' if result['with_data'] else 'synthetic crops'}, "
          f"median of {len(result['step_times_s'])} steps")
    print(f"  backbone {result['backbone']}, K={result['num_prototypes']}, {result['optimizer']}")
    print(f"  FLOPs per image: forward {result['forward_gflop_per_image']} GFLOP, training step "
          f"{result['train_gflop_per_image']} GFLOP ({result['flop_rule']})")
    print(f"{'step (s)':<16} {'images/s':>10} {'GFLOP/s':>10} {'peak RSS (MB)':>14}")
    print(f"{result['step_s']:<16} {result['images_per_s']:>10} {result['gflops_per_s']:>10} "
          f"{result['peak_rss_mb']:>14}")


def check_args(args):
    for name in ("batch_size", "steps", "warmup", "nproc"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        raise SystemExit(f"error: --threads must be 'auto' or a positive integer, got {args.threads}")


def main(args):
    check_args(args)
    inside_launch = int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1
    if args.nproc > 1 and not inside_launch:
        with tempfile.TemporaryDirectory(prefix="passl_bench_photos_") as photos_root:
            if args.with_data:
                make_benchmark_photos(args, photos_root)
            result = launch(args, photos_root if args.with_data else None)
    elif args.with_data and not args.photos_root:
        with tempfile.TemporaryDirectory(prefix="passl_bench_photos_") as photos_root:
            make_benchmark_photos(args, photos_root)
            result = measure(args, photos_root)
    else:
        result = measure(args, args.photos_root)
    if result is None:  # not rank 0
        return 0
    if args.result_file:  # a launched rank 0 hands its result to the parent
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return 0
    print_table(result)
    if args.json:
        print(json.dumps(result))
    return 0


def make_benchmark_photos(args, root):
    """Enough 500x375 JPEGs (the data benchmark's) for every step of every process."""
    from benchmarks.data_pipeline import make_photos

    count = args.batch_size * args.nproc * (args.warmup + args.steps)
    make_photos(os.path.join(root, "photos"), count, quality=90)
