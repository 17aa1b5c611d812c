"""ONNX: our static graphs converted with paddle2onnx, ``.onnx`` files run with onnxruntime.

ONNX is how features leave Paddle (C++, C#, Java, JavaScript, mobile runtimes). Both packages
are optional (``pip install -e ".[onnx]"``); without them every ONNX path stops with one line
saying so. Measured here on a ResNet-50 (docs/deploy.md): onnxruntime's CPU kernels give
dygraph's features to ~1e-6 relative, as fast as Paddle Inference with oneDNN or faster.
"""
import contextlib
import os
import sys
import tempfile

import numpy as np

from passl.errors import UserError
from passl.io.onnx_model import INSTALL_HINT, check_onnx_model
from passl.runtime import threads_per_process

#: ONNX operator set of the exports: 13 runs in every current runtime (onnxruntime >= 1.6,
#: onnxruntime-web/-mobile, OpenVINO, TensorRT) and holds every operator a ResNet needs
OPSET = 13
DEVICES = ("auto", "cpu", "gpu")


def require(module, purpose):
    """Import ``module`` or stop with one line naming the extra that installs it."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module}, which is not installed: "
                        f"{INSTALL_HINT}") from None


@contextlib.contextmanager
def native_output_to(path):
    """Send what C++ code prints on stdout/stderr to the file ``path`` inside the block
    (paddle2onnx prints progress lines, which would mix into a tool's own output)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def paddle_to_onnx(graph_file, params_file, output_path):
    """Convert a ``paddle.jit.save`` graph to the ONNX model ``output_path`` (written whole
    or not at all). paddle2onnx's optimiser is off: its default one (polygraphy) installs
    packages with pip while it runs, and onnxruntime optimises the graph when it loads it."""
    paddle2onnx = require("paddle2onnx", "ONNX export")
    with tempfile.TemporaryDirectory(prefix="passl-onnx-") as scratch:
        log = os.path.join(scratch, "paddle2onnx.log")
        try:
            with native_output_to(log):
                model = paddle2onnx.export(graph_file, params_file, None, opset_version=OPSET,
                                           auto_upgrade_opset=True, enable_onnx_checker=True,
                                           optimize_tool="None", verbose=False)
        except Exception as e:  # it swallows its own errors and then fails on the result
            with open(log, errors="replace") as f:
                said = " ".join(f.read().split())[-300:]
            raise UserError(f"ONNX export: paddle2onnx could not convert the graph "
                            f"({type(e).__name__}; it said: {said or 'nothing'}); export "
                            f"without --format onnx, or report the model") from None
    tmp = output_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(model)
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return output_path


class OnnxEngine:
    """An onnxruntime session over one float32 input and one output, with the interface of
    :class:`passl.deploy.engine.InferenceEngine`.

    The model is checked first (:func:`passl.io.onnx_model.check_onnx_model`): files from
    others may name data outside their directory or custom operators.

    Args:
        path: the ``.onnx`` file.
        device: ``cpu``, ``gpu`` (needs onnxruntime-gpu's CUDA provider) or ``auto``.
        threads: intra-op CPU threads (None: as the process,
            :func:`passl.runtime.threads_per_process`).
    """

    def __init__(self, path, device="auto", threads=None):
        ort = require("onnxruntime", "running ONNX models")
        if device not in DEVICES:
            raise UserError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
        check_onnx_model(path)
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "gpu" and not cuda:
            raise UserError("device gpu: this onnxruntime has no CUDA provider (install "
                            "onnxruntime-gpu); use --device cpu")
        self.device = "gpu" if device == "gpu" or (device == "auto" and cuda) else "cpu"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or threads_per_process())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no notes about unused initializers
        providers = (["CUDAExecutionProvider"] if self.device == "gpu" else []) + \
            ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images):
        """Outputs ``[B, ...]`` (NumPy float32) of an NCHW float32 batch."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {self.input_name: images})[0]
