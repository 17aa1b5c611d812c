"""Run a static graph with Paddle Inference, and compile a dygraph layer into one (or into
an onnxruntime session: :mod:`passl.deploy.onnx_runtime`).

Paddle Inference fuses convolution + BatchNorm + activation and, on CPU, runs oneDNN
kernels; for a ResNet-50 forward pass that is about twice dygraph's speed on this
project's machine (docs/benchmarks.md) at float32 with the same results to ~1e-6
relative. ``precision='bfloat16'`` (oneDNN, CPUs with AVX512-BF16) is faster still but
not exact, so nothing in the toolkit uses it unless asked.
"""
import contextlib
import os
import tempfile

import numpy as np
import paddle

from passl.errors import UserError
from passl.io.inference_model import check_graph, model_prefix
from passl.runtime import has_gpu, launcher_card, threads_per_process

PRECISIONS = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "gpu")
# GPU memory pool Paddle Inference starts with (MB); it grows on demand.
GPU_INITIAL_POOL_MB = 256


def cpu_supports_bfloat16():
    """True when the CPU advertises AVX512-BF16 (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


class InferenceEngine:
    """A Paddle Inference predictor over one float32 input and one output.

    Args:
        graph_file, params_file: what ``paddle.jit.save`` wrote.
        device: ``cpu``, ``gpu`` or ``auto`` (GPU when Paddle sees one).
        threads: CPU math threads (None: as the process,
            :func:`passl.runtime.threads_per_process`).
        onednn: use oneDNN kernels on CPU (Paddle's default; ``False`` for the plain CPU path).
        precision: ``float32`` or ``bfloat16`` (oneDNN on CPU only).
        trust_model: run operators our exporter does not write (``--trust-model``); by
            default the graph is refused unless :func:`~passl.io.inference_model.check_graph`
            passes it, and operators that touch files are refused always.
    """

    def __init__(self, graph_file, params_file, device="auto", threads=None, onednn=True,
                 precision="float32", trust_model=False):
        check_graph(graph_file, trust=trust_model)  # before Paddle reads a byte of it
        if device not in DEVICES:
            raise UserError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
        if precision not in PRECISIONS:
            raise UserError(f"precision: expected one of {', '.join(PRECISIONS)}, "
                            f"got {precision!r}")
        if device == "gpu" and not has_gpu():
            raise UserError("device gpu: Paddle sees no CUDA device; use --device cpu")
        self.device = "gpu" if device == "gpu" or (device == "auto" and has_gpu()) else "cpu"
        if precision == "bfloat16" and (self.device != "cpu" or not onednn):
            raise UserError("precision bfloat16 runs on CPU with oneDNN only")
        config = paddle.inference.Config(graph_file, params_file)
        config.disable_glog_info()
        if self.device == "gpu":
            # the card this process trains on (passl.runtime.select_device uses the same)
            config.enable_use_gpu(GPU_INITIAL_POOL_MB, launcher_card())
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(int(threads or threads_per_process()))
            if onednn:
                config.enable_onednn()
                if precision == "bfloat16":
                    config.enable_onednn_bfloat16()
            else:
                config.disable_onednn()
        try:
            self.predictor = paddle.inference.create_predictor(config)
        except Exception as e:  # noqa: BLE001 - Paddle's C++ errors arrive as several types
            raise UserError(f"{graph_file}: Paddle Inference cannot load this model "
                            f"({_first_line(e)}); export it again") from None
        self.graph_file = graph_file
        inputs, outputs = self.predictor.get_input_names(), self.predictor.get_output_names()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{graph_file}: {len(inputs)} input(s) and {len(outputs)} "
                            f"output(s); the toolkit runs models with one of each")
        self.input = self.predictor.get_input_handle(inputs[0])
        self.output = self.predictor.get_output_handle(outputs[0])

    def __call__(self, images):
        """Outputs ``[B, ...]`` (NumPy float32) of an NCHW float32 batch."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        self.input.reshape(list(images.shape))
        self.input.copy_from_cpu(images)
        try:
            self.predictor.run()
        except Exception as e:  # noqa: BLE001 - as in __init__
            raise UserError(f"{self.graph_file}: Paddle Inference failed on a batch of shape "
                            f"{list(images.shape)} ({_first_line(e)}); export the model "
                            f"again") from None
        return self.output.copy_to_cpu()


def _first_line(error):
    """The first non-empty line of a Paddle error (they run to dozens of lines of C++
    stack), shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


class ModelFeatures(paddle.nn.Layer):
    """``images -> model.extract_features(images)``: the pooled features kNN and the linear
    layer see, as a layer with a single-tensor forward that paddle.jit.save can trace."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.extract_features(images)


@contextlib.contextmanager
def eval_mode(layer):
    """``layer`` and its sublayers in eval mode inside the block, their own modes after.

    Sets the flags directly: ``Layer.eval()``/``train()`` would also flip Paddle's global
    tracer mode under a caller that is training.
    """
    modes = [(sublayer, sublayer.training) for sublayer in layer.sublayers(include_self=True)]
    for sublayer, _ in modes:
        sublayer.training = False
    try:
        yield layer
    finally:
        for sublayer, mode in modes:
            sublayer.training = mode


def save_static(layer, prefix, input_shape, input_name="images"):
    """``paddle.jit.save`` of ``layer`` (its eval-mode forward) for float32 ``input_shape``
    (-1 or None for a dynamic dimension); returns ``(graph file, params file)``."""
    shape = [None if d in (None, -1) else int(d) for d in input_shape]
    with eval_mode(layer):
        paddle.jit.save(layer, prefix, input_spec=[paddle.static.InputSpec(shape, "float32",
                                                                           input_name)])
    graph = next(prefix + ext for ext in (".json", ".pdmodel") if os.path.isfile(prefix + ext))
    return graph, prefix + ".pdiparams"


#: what compiles a layer: Paddle Inference, or onnxruntime on its ONNX conversion
COMPILED_ENGINES = ("inference", "onnxruntime")


def compile_layer(layer, input_shape, engine="inference", **engine_options):
    """An engine running ``layer``'s current weights (a frozen copy: later changes to
    ``layer`` are not seen): an :class:`InferenceEngine`, or with ``engine="onnxruntime"`` an
    :class:`~passl.deploy.onnx_runtime.OnnxEngine` on the graph converted by paddle2onnx.
    The files go through a temporary directory."""
    if engine not in COMPILED_ENGINES:
        raise UserError(f"engine {engine!r}: expected one of {', '.join(COMPILED_ENGINES)}")
    with tempfile.TemporaryDirectory(prefix="passl-compile-") as directory:
        graph, params = save_static(layer, model_prefix(directory), input_shape)
        # an engine reads its files when it is created, so the directory may go
        if engine == "onnxruntime":
            from passl.deploy.onnx_runtime import OnnxEngine, paddle_to_onnx
            return OnnxEngine(paddle_to_onnx(graph, params, os.path.join(directory,
                                                                         "model.onnx")),
                              **engine_options)
        return InferenceEngine(graph, params, **engine_options)
