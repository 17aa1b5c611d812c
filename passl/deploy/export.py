"""``tools/export_model.py``: a config's model with trained weights -> an inference directory.

What is exported:
    ``logits``    the whole Classification model (backbone + linear layer): class scores.
                  The default for ``--load`` of a model that has a classifier.
    ``features``  the backbone alone: pooled features ``[B, C]`` for retrieval, clustering
                  or kNN. The default with ``--pretrained`` (backbone weights only).

Formats: ``paddle`` (a Paddle Inference graph + weights) or ``onnx`` (``model.onnx`` for any
ONNX runtime); both with the same ``inference.yml``.

Preprocessing is the config's ``dataloader.val.dataset.transforms``. When they do not fix the
image size (the digits demo feeds ready-made 32 px images) a ``Resize`` to the val images'
size is put in front, so any image file comes out at the model's input size.
"""
import copy
import os
import shutil
import tempfile

import numpy as np
import paddle

from passl.config import to_plain
from passl.data import DATASETS
from passl.data.transforms import build_pipeline
from passl.deploy.engine import InferenceEngine, ModelFeatures, eval_mode, save_static
from passl.errors import ConfigError, UserError
from passl.io.checkpoint import load_model_weights
from passl.io.inference_model import META_FILE, OUTPUTS, model_prefix, write_meta
from passl.io.onnx_model import ONNX_FILE
from passl.io.safe_write import reporting_write_errors
from passl.io.weights import load_pretrained
from passl.models import MODELS
from passl.utils.logger import get_logger

# Two unrelated image sizes: a pipeline that maps both to one shape fixes the input size.
PROBE_SIZES = ((37, 53), (300, 200))
#: format -> how far the exported model may be from dygraph before export refuses it
#: (relative; onnxruntime fuses and orders float32 sums its own way)
MAX_RELATIVE_ERROR = {"paddle": 1e-5, "onnx": 1e-4}


class ClassifierLogits(paddle.nn.Layer):
    """``images -> logits`` of a Classification model (its forward takes ``(images, labels)``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.fc(self.model.extract_features(images))


def exported_layer(model, output):
    if output == "features":
        if not hasattr(model, "extract_features"):
            raise UserError(f"model: {type(model).__name__} has no extract_features() to export")
        return ModelFeatures(model)
    if not hasattr(model, "fc"):
        raise UserError(f"--what logits: model {type(model).__name__} has no classifier; "
                        f"export its backbone with --what features")
    return ClassifierLogits(model)


def _val_dataset_block(cfg):
    block = ((cfg.get("dataloader") or {}).get("val") or {}).get("dataset")
    if not isinstance(block, dict) or not block.get("transforms"):
        raise ConfigError("dataloader.val.dataset.transforms: export stores the val transforms "
                          "as the model's preprocessing; list them (e.g. Resize, CenterCrop, "
                          "Normalize with to_chw: true)")
    return block


def _chw_shape(sample, where):
    if not (isinstance(sample, np.ndarray) and sample.ndim == 3 and sample.shape[0] == 3
            and sample.dtype == np.float32):
        raise ConfigError(f"{where}: the val transforms must end in a float32 CHW image "
                          f"(Normalize with to_chw: true, or ToCHW); got "
                          f"{getattr(sample, 'shape', type(sample).__name__)}")
    return tuple(int(d) for d in sample.shape)


def preprocessing(cfg):
    """``(transform blocks, input shape (3, H, W))`` inference applies (see module docstring)."""
    block = _val_dataset_block(cfg)
    transforms = to_plain(list(block["transforms"]))
    pipeline = build_pipeline(transforms)
    where = "dataloader.val.dataset.transforms"
    rng = np.random.default_rng(0)
    shapes = {_chw_shape(pipeline(np.zeros(size + (3,), np.uint8), rng), where)
              for size in PROBE_SIZES}
    if len(shapes) == 1:
        return transforms, shapes.pop()
    dataset = DATASETS.build({**copy.deepcopy(block), "transforms": None})
    height, width = dataset[0][0].shape[:2]
    get_logger().info(f"the val transforms keep the image size; exported preprocessing resizes "
                      f"every image to the val images' {height}x{width} first")
    transforms.insert(0, {"name": "Resize", "size": [int(height), int(width)]})
    return transforms, _chw_shape(build_pipeline(transforms)(
        np.zeros(PROBE_SIZES[0] + (3,), np.uint8), rng), where)


def class_names(cfg):
    """The training set's class names (``classes`` of ImageFolder-like datasets), or None."""
    block = ((cfg.get("dataloader") or {}).get("train") or {}).get("dataset")
    if not isinstance(block, dict):
        return None
    try:
        dataset = DATASETS.build({**copy.deepcopy(block), "transforms": None})
    except UserError as e:
        get_logger().warning(f"class names left out (the train set could not be read: {e})")
        return None
    return list(getattr(dataset, "classes", None) or []) or None


def _check_output_dir(directory, overwrite):
    if os.path.isfile(directory):
        raise UserError(f"--output {directory}: a file; pass a directory")
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise UserError(f"--output {directory}: directory is not empty; choose a new one or "
                        f"pass --overwrite")


def relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1e-12))


def _write_model(output_dir, layer, input_shape, model_format):
    """The model files of ``model_format`` in ``output_dir``; returns a function that makes
    an engine running them (on CPU)."""
    if model_format == "paddle":
        graph, params = save_static(layer, model_prefix(output_dir), input_shape)
        return lambda: InferenceEngine(graph, params, device="cpu")
    from passl.deploy.onnx_runtime import OnnxEngine, paddle_to_onnx
    with tempfile.TemporaryDirectory(prefix="passl-export-") as scratch:
        graph, params = save_static(layer, model_prefix(scratch), input_shape)
        path = paddle_to_onnx(graph, params, os.path.join(output_dir, ONNX_FILE))
    return lambda: OnnxEngine(path, device="cpu")


def _write_export(output_dir, layer, input_shape, what, transforms, names, model_format):
    """The inference directory, whole or not at all: a failed write (e.g. a full disk) is one
    OutputWriteError, and a directory this call created is removed again (also when the
    ONNX conversion fails)."""
    created = not os.path.exists(output_dir)
    try:
        with reporting_write_errors(output_dir):
            os.makedirs(output_dir, exist_ok=True)
            make_engine = _write_model(output_dir, layer, input_shape, model_format)
            write_meta(output_dir, what, input_shape, transforms, names)
    except UserError:
        if created:
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    return make_engine


def export_model(cfg, output_dir, pretrained=None, load=None, what=None, batch_size=None,
                 overwrite=False, model_format="paddle"):
    """Build ``cfg.model``, load the weights, write the inference directory ``output_dir``.

    Args:
        pretrained: backbone weights (``--pretrained``), or
        load: a whole-model checkpoint or state dict (``--load``).
        what: ``features`` or ``logits``; None picks logits for ``--load`` of a model with a
            classifier, else features.
        batch_size: a fixed batch size; None exports a dynamic batch dimension.
        model_format: ``paddle`` (a Paddle Inference graph and weights) or ``onnx``
            (``model.onnx``, converted by paddle2onnx; the ``[onnx]`` extra).

    Returns:
        ``{'output': what, 'input_shape': [...], 'relative_error': vs dygraph, 'classes': n}``.
    """
    if (pretrained is None) == (load is None):
        raise UserError("pass exactly one of --pretrained W (backbone weights) or --load CKPT "
                        "(the whole model)")
    if what is not None and what not in OUTPUTS:
        raise UserError(f"--what {what}: expected one of {', '.join(OUTPUTS)}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: expected a positive integer (or leave it "
                        f"out for a dynamic batch)")
    if model_format not in MAX_RELATIVE_ERROR:
        raise UserError(f"--format {model_format}: expected one of "
                        f"{', '.join(MAX_RELATIVE_ERROR)}")
    if model_format == "onnx":  # before any work: say at once what is missing
        from passl.deploy.onnx_runtime import require
        require("paddle2onnx", "--format onnx")
        require("onnxruntime", "--format onnx")
    _check_output_dir(output_dir, overwrite)
    model = MODELS.build(cfg.get("model"))
    if load:
        load_model_weights(model, load)
    else:
        load_pretrained(model.backbone, pretrained)
    if what is None:
        what = "logits" if load and hasattr(model, "fc") else "features"
    if what == "logits" and pretrained:
        raise UserError("--what logits needs the trained classifier: pass --load CKPT (with "
                        "--pretrained only the backbone is trained)")
    layer = exported_layer(model, what)
    transforms, chw = preprocessing(cfg)
    names = class_names(cfg) if what == "logits" else None

    input_shape = [batch_size or -1, *chw]
    make_engine = _write_export(output_dir, layer, input_shape, what, transforms, names,
                                model_format)

    probe = np.random.default_rng(0).standard_normal((batch_size or 2, *chw)).astype("float32")
    with eval_mode(layer), paddle.no_grad():
        expected = layer(paddle.to_tensor(probe)).numpy()
    error = relative_error(make_engine()(probe), expected)
    limit = MAX_RELATIVE_ERROR[model_format]
    if error > limit:
        raise UserError(f"--output {output_dir}: the exported model differs from dygraph by "
                        f"{error:.2e} relative (limit {limit:g}); please report it")
    return {"output": what, "input_shape": input_shape, "relative_error": error,
            "classes": len(names) if names else 0, "meta": os.path.join(output_dir, META_FILE)}
