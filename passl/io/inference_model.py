"""The exported-model directory: a static graph, its weights and ``inference.yml``.

``tools/export_model.py`` writes, and ``tools/predict.py`` (or any Paddle Inference user)
reads, one directory (``--format onnx`` writes ``model.onnx`` instead of the graph and
weights: :mod:`passl.io.onnx_model`)::

    model.json         the static graph (paddle.jit.save; ``model.pdmodel`` in old Paddle)
    model.pdiparams    its weights
    inference.yml      everything inference needs besides the graph, so no training config:

        kind: passl-inference-model
        version: 1
        output: features | logits      pooled backbone features [B, C], or class scores [B, K]
        input: {name: images, shape: [-1 or B, 3, H, W], dtype: float32}
        transforms: [...]              passl.data.transforms blocks, applied to HWC uint8 RGB
                                       images and ending in a float32 CHW array of the input size
        class_names: [...]             index -> name (absent when the training set had none)

The transforms are the training config's ``dataloader.val.dataset.transforms`` (what
``--evaluate-only`` feeds the model), so the exported model sees exactly those pixels.
"""
import os

import yaml

from passl.errors import UserError

KIND = "passl-inference-model"
VERSION = 1
MODEL_PREFIX = "model"
PARAMS_FILE = MODEL_PREFIX + ".pdiparams"
#: graph files paddle.jit.save writes: PIR (Paddle 3) first, the legacy ProgramDesc second
GRAPH_FILES = (MODEL_PREFIX + ".json", MODEL_PREFIX + ".pdmodel")
META_FILE = "inference.yml"
OUTPUTS = ("features", "logits")


def model_prefix(directory):
    """The path prefix ``paddle.jit.save`` writes to inside ``directory``."""
    return os.path.join(directory, MODEL_PREFIX)


def write_meta(directory, output, input_shape, transforms, class_names=None, input_name="images"):
    """Write ``inference.yml`` (see the module docstring); returns its path."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    meta = {"kind": KIND, "version": VERSION, "output": output,
            "input": {"name": input_name, "shape": [int(d) for d in input_shape],
                      "dtype": "float32"},
            "transforms": list(transforms)}
    if class_names is not None:
        meta["class_names"] = [str(name) for name in class_names]
    path = os.path.join(directory, META_FILE)
    with open(path, "w") as f:
        yaml.safe_dump(meta, f, sort_keys=False, default_flow_style=None)
    return path


def _graph_file(directory):
    for name in GRAPH_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def read_model_dir(directory):
    """``(graph file, params file, meta dict)`` of an exported model directory.

    Anything missing or malformed is a one-line UserError naming the path and the fix.
    """
    fix = "export one with tools/export_model.py -c CFG --load CKPT --output DIR"
    if not os.path.exists(directory):
        raise UserError(f"model dir {directory}: not found; {fix}")
    if not os.path.isdir(directory):
        raise UserError(f"model dir {directory}: a file, not the directory "
                        f"tools/export_model.py writes; {fix}")
    graph, params = _graph_file(directory), os.path.join(directory, PARAMS_FILE)
    meta_path = os.path.join(directory, META_FILE)
    missing = [name for name, path in ((" or ".join(GRAPH_FILES), graph), (PARAMS_FILE, params),
                                       (META_FILE, meta_path))
               if path is None or not os.path.isfile(path)]
    if missing:
        raise UserError(f"model dir {directory}: no {', '.join(missing)}; not an exported "
                        f"model; {fix}")
    return graph, params, read_meta(directory)


def read_meta(directory):
    """The checked ``inference.yml`` of an export directory (Paddle or ONNX) as a dict."""
    meta_path = os.path.join(directory, META_FILE)
    try:
        with open(meta_path) as f:
            meta = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{meta_path}: not valid YAML ({type(e).__name__}); re-export the "
                        f"model") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise UserError(f"{meta_path}: kind is not {KIND!r}; re-export the model")
    if meta.get("version", 0) > VERSION:
        raise UserError(f"{meta_path}: version {meta['version']} is newer than this code "
                        f"reads ({VERSION}); update PASSL")
    for key in ("output", "input", "transforms"):
        if key not in meta:
            raise UserError(f"{meta_path}: key '{key}' missing; re-export the model")
    if meta["output"] not in OUTPUTS:
        raise UserError(f"{meta_path}: output {meta['output']!r} is not one of "
                        f"{', '.join(OUTPUTS)}; re-export the model")
    return meta
