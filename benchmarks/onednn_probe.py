"""Can Paddle's oneDNN kernels make the CPU training step faster, exactly? Operator by operator.

    python benchmarks/onednn_probe.py [--cases conv,conv_bn,...] [--rounds 5] [--threads 2] [--json]

Every case is a small network (one 3x3 convolution, then BatchNorm in training mode, ReLU,
max-pooling added one at a time, a ResNet-50 bottleneck block, the whole ResNet-50) and one
training step of it: forward, ``loss = sum(y * g)`` for a fixed random ``g``, and the
gradients of the loss for the input and every parameter (``paddle.grad``). That step runs in
several *routes*, each on its own copy of the same weights:

    eager         dynamic graph, Paddle's default CPU kernels (what the trainer runs)
    static        the same step under ``paddle.jit.to_static`` (PIR interpreter), no oneDNN
    onednn        ``paddle.jit.to_static`` built with ``FLAGS_use_mkldnn=1``: the PIR kernel
                  pass places oneDNN kernels (``onednn_op.*``) where it has them
    eager-flag    dynamic graph with ``FLAGS_use_mkldnn=1`` set (does eager pick oneDNN?)
    onednn-bwd    forward under to_static + oneDNN, ``loss.backward()`` outside it (how a
                  to_static model trains normally); the same route the trainer would use
    onednn-conv   per-operator: eager everywhere except each convolution's gradient, which
                  runs oneDNN's conv2d_grad in a small to_static program (OneDNNConvGradient)

Errors are relative, the worst tensor reported, in the max norm (max |a - b| / max |b|) and
in the 2-norm (||a - b|| / ||b||), over the forward output, the input gradient and each
parameter gradient, against the same step in float64 (``err64``) and against eager float32
(``vs eager``, the adoption criterion: <= 1e-5); ``BN stats`` is the worst BatchNorm running
mean/variance after the step, against eager's. Eager float32's own ``err64`` says how far
plain float32 rounding goes on the same step. Times are medians of ``--rounds`` rounds in
which the routes alternate (order reversed every other round), so background load hits them
alike; GFLOP/s count convolutions only (multiply-add = 2 FLOPs, backward = 2 x forward).

Each case runs in its own subprocess. Every route is first tried alone (two steps, no
timing): one that kills the process (segfault, abort) is reported as that route's failure.
The survivors then run together, interleaved; if that process dies anyway (some oneDNN
crashes are intermittent), each survivor is timed alone beside eager, marked ``alone`` in
the JSON. Results and the conclusions: docs/benchmarks.md, "oneDNN for training". Nothing
here asserts a time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: case -> (what it is, input shape)
CASES = {
    "conv": ("3x3 conv 64->64", (8, 64, 56, 56)),
    "conv_nhwc": ("3x3 conv 64->64, channels-last (NHWC)", (8, 64, 56, 56)),
    "conv_bn": ("conv + BatchNorm (training)", (8, 64, 56, 56)),
    "conv_bn_relu": ("conv + BN + ReLU", (8, 64, 56, 56)),
    "conv_bn_relu_pool": ("conv + BN + ReLU + 3x3/2 max-pool", (8, 64, 56, 56)),
    "bottleneck": ("ResNet-50 bottleneck block 256->64->256", (8, 256, 56, 56)),
    "resnet50": ("ResNet-50 trunk + global pool", (2, 3, 224, 224)),
    "resnet50_stages": ("ResNet-50 without stem and global pool (4 stages)", (2, 64, 56, 56)),
}
DEFAULT_CASES = ("conv", "conv_bn", "conv_bn_relu", "conv_bn_relu_pool", "bottleneck", "resnet50")
ROUTES = ("eager", "static", "onednn", "eager-flag", "onednn-bwd", "onednn-conv")
DEFAULT_ROUTES = ROUTES


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--routes", default=",".join(DEFAULT_ROUTES),
                        help=f"comma-separated, from {', '.join(ROUTES)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per route (5)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--worker", choices=tuple(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option, valid in (("cases", CASES), ("routes", ROUTES)):
        unknown = [name for name in getattr(args, option).split(",") if name not in valid]
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(valid)}")
    return args


# ---------------------------------------------------------------------- one case, in a worker

def build_layer(case):
    import paddle.nn as nn

    from passl.models.backbones.resnet import BottleneckBlock, ResNet

    if case == "resnet50":  # the pooled map, not flattened: to_static has no flatten_grad
        trunk = ResNet(depth=50)
        return nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1,
                             trunk.layer2, trunk.layer3, trunk.layer4, trunk.avgpool)
    if case == "resnet50_stages":
        trunk = ResNet(depth=50)
        return nn.Sequential(trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
    if case == "bottleneck":
        return BottleneckBlock(256, 64, 1, None, "NCHW")
    data_format = "NHWC" if case == "conv_nhwc" else "NCHW"
    layers = [nn.Conv2D(64, 64, 3, padding=1, bias_attr=False, data_format=data_format)]
    if case.startswith("conv_bn"):
        layers.append(nn.BatchNorm2D(64))
    if "relu" in case:
        layers.append(nn.ReLU())
    if case.endswith("pool"):
        layers.append(nn.MaxPool2D(3, stride=2, padding=1))
    return nn.Sequential(*layers)


def conv_flop(layer, x):
    """FLOPs of forward + backward (input and weight gradients) of the layer's convolutions."""
    import numpy as np
    import paddle.nn as nn

    macs = [0]

    def record(conv, inputs, output):
        macs[0] += int(np.prod(output.shape)) * int(np.prod(conv.weight.shape[1:]))

    handles = [sub.register_forward_post_hook(record) for sub in layer.sublayers()
               if isinstance(sub, nn.Conv2D)]
    layer(x)
    for handle in handles:
        handle.remove()
    return 2 * macs[0] * 3


def make_case(case, seed=0):
    """(layer factory, x, g) with fixed weights so every route starts from the same state."""
    import numpy as np
    import paddle

    paddle.seed(seed)
    layer = build_layer(case)
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(CASES[case][1])
    if case == "conv_nhwc":
        x = x.transpose(0, 2, 3, 1).copy()
    with paddle.no_grad():
        y = layer(paddle.to_tensor(x.astype("float32")))
    g = rng.standard_normal(y.shape)

    def fresh(dtype):
        copy = build_layer(case)
        if dtype != "float32":
            copy.to(dtype=dtype)
        copy.set_state_dict({k: paddle.to_tensor(v.astype(dtype) if v.dtype.kind == "f" else v)
                             for k, v in state.items()})
        copy.train()
        return copy

    return fresh, x, g


def step_function(layer):
    """One training step: output, d loss / d input, d loss / d every parameter."""
    import paddle

    params = [p for p in layer.parameters() if not p.stop_gradient]

    def step(x, g):
        y = layer(x)
        wrt = [x] + [as_traced(p) for p in params]
        return [y] + list(paddle.grad((y * g).sum(), wrt))

    return step


def as_traced(parameter):
    """The parameter itself in eager mode; its program value while to_static traces the step."""
    import paddle
    from paddle.pir.core import _convert_into_value

    return parameter if paddle.in_dynamic_mode() else _convert_into_value(parameter)


def buffers(layer):
    """BatchNorm running statistics (Paddle keeps them as parameters that take no gradient):
    training updates them, so they are outputs of the step too."""
    return [p for p in layer.parameters() if p.stop_gradient]


class OneDNNConvGradient:
    """Route ``onednn-conv``: eager forward, oneDNN kernels for each convolution's gradient.

    ``conv(x)`` runs the layer's eager forward inside a PyLayer whose backward calls a
    to_static program built with ``FLAGS_use_mkldnn=1``: ``paddle.grad(sum(conv(x, w) * dy),
    [x, w])``, whose ``conv2d_grad`` is the oneDNN kernel. Everything else stays eager. (The
    plainer ``paddle.grad(y, [x, w], dy)`` and a to_static forward both crash Paddle 3.3.1 when
    a oneDNN kernel's output is the program's output; the probe documents that.)
    """

    def __init__(self, conv):
        import paddle
        import paddle.nn.functional as F
        from paddle.autograd import PyLayer

        attrs = dict(stride=conv._stride, padding=conv._padding, dilation=conv._dilation,
                     groups=conv._groups, data_format=conv._data_format)

        def gradients(x, weight, dy):
            return paddle.grad((F.conv2d(x, weight, **attrs) * dy).sum(), [x, weight])

        program = paddle.jit.to_static(gradients, full_graph=True)

        class ConvWithOneDNNGradient(PyLayer):
            @staticmethod
            def forward(ctx, x, weight):
                ctx.save_for_backward(x, weight)
                return F.conv2d(x, weight, **attrs)

            @staticmethod
            def backward(ctx, dy):
                x, weight = (t.detach() for t in ctx.saved_tensor())
                x.stop_gradient = weight.stop_gradient = False
                paddle.set_flags({"FLAGS_use_mkldnn": True})
                try:
                    with paddle.enable_grad():  # else to_static marks x, w as constants
                        return tuple(program(x, weight, dy))
                finally:
                    paddle.set_flags({"FLAGS_use_mkldnn": False})

        self.apply = ConvWithOneDNNGradient.apply
        self.conv = conv

    def __call__(self, x):
        return self.apply(x, self.conv.weight)


def with_onednn_conv_gradients(layer):
    import paddle.nn as nn

    for sub in layer.sublayers(include_self=True):
        if isinstance(sub, nn.Conv2D):
            sub.forward = OneDNNConvGradient(sub)
    return layer


def route_runner(route, fresh):
    """``run(x, g) -> list of numpy outputs`` for one route, built on its own layer copy."""
    import paddle

    layer = fresh("float32")
    if route in ("eager", "eager-flag"):
        step = step_function(layer)
    elif route == "onednn-conv":
        step = step_function(with_onednn_conv_gradients(layer))
    elif route in ("static", "onednn"):
        step = paddle.jit.to_static(step_function(layer), full_graph=True)
    else:  # onednn-bwd: the model is static, the backward is the run_program op's
        static_layer = paddle.jit.to_static(layer, full_graph=True)
        params = [p for p in layer.parameters() if not p.stop_gradient]

        def step(x, g):
            y = static_layer(x)
            (y * g).sum().backward()
            grads = [x.grad] + [p.grad for p in params]
            out = [y] + [grad.clone() for grad in grads]
            x.clear_gradient()
            for p in params:
                p.clear_gradient()
            return out

    flag = route in ("onednn", "eager-flag", "onednn-bwd")

    def run(x, g):
        paddle.set_flags({"FLAGS_use_mkldnn": flag})
        outputs = step(x, g)
        result = [o.numpy() for o in outputs] + [b.numpy() for b in buffers(layer)]
        paddle.set_flags({"FLAGS_use_mkldnn": False})
        return result

    return run


def relative_errors(outputs, reference, names):
    """Worst over the tensors of (max |a-b| / max |b|, ||a-b|| / ||b||, the worst tensor's name).

    Both norms are reported because they answer different questions: a ReLU or max-pool whose
    input sits within rounding of its switching point routes a whole gradient element the
    other way when the last bits change, which moves the max error by up to O(1) while the
    norm error still shows how close the arithmetic is.
    """
    import numpy as np

    worst_max = worst_norm = 0.0
    worst_name = "-"
    for a, b, name in zip(outputs, reference, names):
        difference = a.astype("float64") - b
        if np.abs(b).max() > 0:
            worst_max = max(worst_max, float(np.abs(difference).max() / np.abs(b).max()))
            norm = float(np.linalg.norm(difference) / np.linalg.norm(b))
            if norm > worst_norm:
                worst_norm, worst_name = norm, name
    return worst_max, worst_norm, worst_name


def output_names(layer):
    """Names of what a runner returns, in its order."""
    trainable = [f"d {name}" for name, p in layer.named_parameters() if not p.stop_gradient]
    statistics = [name for name, p in layer.named_parameters() if p.stop_gradient]
    return ["output", "d input"] + trainable + statistics


def worker(args):
    import paddle

    paddle.base.core.set_num_threads(args.threads)
    case = args.worker
    routes = args.routes.split(",")
    fresh, x64, g64 = make_case(case)
    x32, g32 = x64.astype("float32"), g64.astype("float32")

    def tensors(x, g):
        return paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(g)

    if args.preflight:  # only: does this route survive building and two calls?
        runner = route_runner(routes[0], fresh)
        runner(*tensors(x32, g32))
        runner(*tensors(x32, g32))
        return print(json.dumps({"case": case, "preflight": "ok"}))
    reference_layer = fresh("float64")
    reference = [o.numpy() for o in step_function(reference_layer)(*tensors(x64, g64))]
    reference += [b.numpy() for b in buffers(reference_layer)]
    flop = conv_flop(fresh("float32"), paddle.to_tensor(x32))
    names = output_names(reference_layer)
    running_statistics = len(buffers(reference_layer))

    results, runners, first = {}, {}, {}
    for route in routes:
        try:
            runner = route_runner(route, fresh)
            first[route] = runner(*tensors(x32, g32))  # first call: errors (and build, untimed)
            runner(*tensors(x32, g32))                  # warm-up (oneDNN primitive caches)
            runners[route] = runner
        except Exception as error:  # a route Paddle cannot run is a result, not a crash
            last_line = str(error).strip().splitlines()[-1][:160]
            results[route] = {"failed": f"{type(error).__name__}: {last_line}"}
            if os.environ.get("PASSL_PROBE_DEBUG"):
                traceback.print_exc()
    times = {route: [] for route in runners}
    for index in range(args.rounds):
        order = list(runners) if index % 2 == 0 else list(reversed(runners))
        for route in order:
            inputs = tensors(x32, g32)
            start = time.perf_counter()
            runners[route](*inputs)
            times[route].append(time.perf_counter() - start)
    for route in runners:
        seconds = statistics.median(times[route])
        results[route] = {"ms": 1000 * seconds, "gflops_per_s": flop / seconds / 1e9}
        grads = slice(0, len(names) - running_statistics)  # output, gradients; BN statistics
        (results[route]["err64_max"], results[route]["err64_norm"],
         results[route]["err64_worst"]) = relative_errors(first[route][grads], reference[grads],
                                                          names[grads])
        if "eager" in first:
            (results[route]["vs_eager_max"], results[route]["vs_eager_norm"],
             results[route]["vs_eager_worst"]) = relative_errors(
                first[route][grads], first["eager"][grads], names[grads])
            results[route]["statistics_vs_eager"] = relative_errors(
                first[route][grads.stop:], first["eager"][grads.stop:], names[grads.stop:])[1]
    print(json.dumps({"case": case, "flop": flop, "routes": results}))


# ---------------------------------------------------------------------- driver

def run_worker(case, routes, args, preflight=False):
    """The worker's JSON line, or ``{"crashed": ...}`` when the process died (a signal)."""
    # the thread count must be in the environment when Paddle loads: oneDNN and MKL read it
    # then (set_num_threads alone left eager at a third of its speed)
    env = dict(os.environ, PYTHONPATH=ROOT, MKL_DEBUG_CPU_TYPE="5",
               OMP_NUM_THREADS=str(args.threads), GLOG_minloglevel="2")
    command = [sys.executable, os.path.abspath(__file__), "--worker", case, "--routes",
               ",".join(routes), "--rounds", str(args.rounds), "--threads", str(args.threads)]
    done = subprocess.run(command + (["--preflight"] if preflight else []), env=env,
                          capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    lines = [line for line in done.stderr.strip().splitlines()
             if "Error" in line or "error" in line or "what()" in line] or ["no output"]
    return {"case": case, "crashed": f"exit code {done.returncode}: {lines[-1].strip()[:150]}"}


def run_case(case, args):
    """Routes that kill the process (segfault, abort) are found one by one first, then the
    others run together, interleaved."""
    routes, crashed = [], {}
    for route in args.routes.split(","):
        result = run_worker(case, [route], args, preflight=True)
        if "crashed" in result:
            crashed[route] = {"failed": result["crashed"]}
        else:
            routes.append(route)
    row = run_worker(case, routes, args) if routes else {"case": case, "routes": {}}
    if "crashed" in row:  # routes that live alone but not together: time them apart
        row = {"case": case, "routes": {}, "not_interleaved": row["crashed"]}
        for route in routes:
            alone = run_worker(case, ["eager", route] if route != "eager" else [route], args)
            row["routes"][route] = alone.get("routes", {}).get(
                route, {"failed": alone.get("crashed")})
            row["routes"][route]["alone"] = True
    row.setdefault("routes", {}).update(crashed)
    return row


def print_table(rows, routes):
    """One line per (case, route): median ms, conv GFLOP/s, speed-up over eager, errors."""
    print(f"{'case':<18} {'route':<11} {'ms':>8} {'GFLOP/s':>7} {'x eager':>7} "
          f"{'max err64':>9} {'norm err64':>10} {'max vs eager':>12} {'norm vs eager':>13} "
          f"{'BN stats':>8}  worst gradient")
    for row in rows:
        if "crashed" in row:
            print(f"{row['case']:<18} {'(all)':<11} crashed: {row['crashed']}")
            continue
        eager = row["routes"].get("eager", {}).get("ms")
        for route in routes:
            result = row["routes"].get(route)
            if result is None:
                continue
            if "failed" in result:
                print(f"{row['case']:<18} {route:<11} failed: {result['failed']}")
                continue
            speedup = f"{eager / result['ms']:.2f}" if eager else "-"
            print(f"{row['case']:<18} {route:<11} {result['ms']:8.1f} "
                  f"{result['gflops_per_s']:7.1f} {speedup:>7} {result['err64_max']:9.1e} "
                  f"{result['err64_norm']:10.1e} {result.get('vs_eager_max', float('nan')):12.1e} "
                  f"{result.get('vs_eager_norm', float('nan')):13.1e} "
                  f"{result.get('statistics_vs_eager', float('nan')):8.1e}  "
                  f"{result.get('vs_eager_worst', '')}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return worker(args)
    routes = args.routes.split(",")
    rows = [run_case(case, args) for case in args.cases.split(",")]
    print_table(rows, routes)
    if args.json:
        print(json.dumps({"threads": args.threads, "rounds": args.rounds, "cases": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
