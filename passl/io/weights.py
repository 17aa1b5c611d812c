"""Backbone weight files: cut them out of training checkpoints and load them into a model.

A weights file (``.pdparams``) is a flat ``{name: Tensor}`` state dict written by
``paddle.save``. :func:`extract_weights` (``tools/extract_weight.py``) keeps the tensors of a
checkpoint's model whose names start with a prefix (``backbone.`` by default);
:func:`load_pretrained` (``tools/train.py --pretrained``, ``tools/knn_eval.py --pretrained``)
loads such a file into a layer and refuses, by default, a file that does not fit it exactly.
"""
import logging
import os
from collections import OrderedDict

import numpy as np

from passl.errors import UserError
from passl.io import foreign_layouts
from passl.io.checkpoint import KIND as CHECKPOINT_KIND, is_training_checkpoint, write_atomic
from passl.io.paddle_file import check_state_dict, load_paddle_file
from passl.io.safe_pickle import printable
from passl.io.safe_write import reporting_write_errors

WEIGHTS_SUFFIX = ".pdparams"
BACKBONE_PREFIX = "backbone."
# How many names an error message shows before "...".
SHOWN_NAMES = 3
# The toolkit's logger, by name: passl.utils.logger (a layer above this one) configures it.
_LOGGER = logging.getLogger("passl")


def names_preview(keys):
    """The first names of ``keys`` for a message, then "..." when there are more."""
    keys = list(keys)
    shown = ", ".join(printable(key, 200) for key in keys[:SHOWN_NAMES])  # names from a file
    return shown + (", ..." if len(keys) > SHOWN_NAMES else "")


def num_values(tensor):
    """Scalars in a tensor (or array)."""
    return int(np.prod(tensor.shape)) if len(tensor.shape) else 1


def read_checkpoint(path, trust=False):
    """The training checkpoint dict at ``path`` (``epoch_N.pd``, or ``latest.pd`` linking to one).

    Accepts any ``paddle.save`` dict with a ``'model'`` state dict; one carrying the engine's
    ``kind`` marker must be a training checkpoint. A PASSL v1 file comes back in our names,
    with ``'recognised'``: one line saying what it was (:mod:`passl.io.foreign_layouts`).
    """
    checkpoint = load_paddle_file(path, "checkpoint", trust)
    layout, foreign = foreign_layouts.recognise(checkpoint, f"checkpoint {path}")
    if foreign is not None:
        model, recognised = layout.model_state(foreign)
        return {"model": model, "epoch": foreign.epoch, "recognised": recognised}
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"checkpoint {path}: not a training checkpoint (no 'model' state dict; "
                        f"weights files are already extracted); pass "
                        f"OUTPUT_DIR/checkpoints/epoch_N.pd or latest.pd of a training run")
    if "kind" in checkpoint and not is_training_checkpoint(checkpoint):
        raise UserError(f"checkpoint {path}: kind {checkpoint['kind']!r:.60}, expected "
                        f"{CHECKPOINT_KIND!r}")
    check_state_dict(checkpoint["model"], f"checkpoint {path}: 'model'")
    return checkpoint


def select_prefix(state_dict, prefix="backbone", remove_prefix=False):
    """The entries of ``state_dict`` named ``prefix.*``, optionally without ``prefix.``."""
    start = prefix.rstrip(".") + "."
    selected = OrderedDict((name[len(start):] if remove_prefix else name, tensor)
                           for name, tensor in state_dict.items() if name.startswith(start))
    if not selected:
        present = sorted({name.split(".")[0] for name in state_dict})
        raise UserError(f"no tensor named '{start}*' in the checkpoint's model; top-level "
                        f"prefixes present: {', '.join(present) or 'none'}; choose one with --prefix")
    return selected


def extract_weights(checkpoint_path, output_path, prefix="backbone", remove_prefix=False,
                    trust=False):
    """Write the ``prefix.*`` tensors of a checkpoint's model to ``output_path`` (whole or not
    at all: a failed write, e.g. a full disk, is one OutputWriteError and leaves no file).

    Returns:
        ``{'tensors': count, 'values': total number of scalars, 'output': output_path,
        'recognised': what a PASSL v1 file was, else None}``.
    """
    if not output_path.endswith(WEIGHTS_SUFFIX):
        raise UserError(f"--output {output_path}: weights files end in {WEIGHTS_SUFFIX} "
                        f"(e.g. --output backbone{WEIGHTS_SUFFIX})")
    checkpoint = read_checkpoint(checkpoint_path, trust)
    weights = select_prefix(checkpoint["model"], prefix, remove_prefix)
    with reporting_write_errors(output_path):
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        write_atomic(weights, output_path)
    return {"tensors": len(weights),
            "values": sum(num_values(t) for t in weights.values()),
            "output": output_path, "recognised": checkpoint.get("recognised")}


def read_weights(path, trust=False):
    """The flat state dict of a ``.pdparams`` weights file (the backbone of another toolkit's
    checkpoint or model, e.g. PASSL v1's, renamed and logged in one line)."""
    weights = load_paddle_file(path, "weights", trust)
    layout, foreign = foreign_layouts.recognise(weights, f"weights {path}")
    if foreign is not None:
        weights, recognised = layout.backbone_state(foreign)
        _LOGGER.info(recognised)
        return weights
    if isinstance(weights, dict) and isinstance(weights.get("model"), dict):
        raise UserError(f"weights {path}: this is a training checkpoint, not a weights file; "
                        f"extract the backbone first: python tools/extract_weight.py {path} "
                        f"--output backbone{WEIGHTS_SUFFIX} --remove-prefix")
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"weights {path}: expected a non-empty {{name: tensor}} state dict")
    return check_state_dict(weights, f"weights {path}")


def _strip_backbone_prefix(weights, expected):
    """Accept files extracted without --remove-prefix: ``backbone.x`` loads into ``x``."""
    if expected.keys() & weights.keys():
        return weights
    if all(name.startswith(BACKBONE_PREFIX) for name in weights):
        return OrderedDict((name[len(BACKBONE_PREFIX):], t) for name, t in weights.items())
    return weights


def load_pretrained(layer, path, strict=True, trust=False):
    """Load the weights file ``path`` into ``layer`` (usually ``model.backbone``).

    Names are matched exactly (a file whose every name starts with ``backbone.`` has that
    prefix dropped first). With ``strict`` any missing, unexpected or shape-mismatched
    tensor is a :class:`~passl.errors.UserError` listing the counts and the first names;
    without it the matching tensors are loaded and the rest is logged as a warning.
    ``trust`` reads the file with ``paddle.load`` (:func:`~passl.io.paddle_file.load_paddle_file`).

    Returns:
        ``{'loaded': [...], 'missing': [...], 'unexpected': [...], 'mismatched': [...]}``.
    """
    expected = layer.state_dict()
    weights = _strip_backbone_prefix(read_weights(path, trust), expected)
    mismatched = [f"{name} {list(weights[name].shape)} vs {list(expected[name].shape)}"
                  for name in expected
                  if name in weights and list(weights[name].shape) != list(expected[name].shape)]
    report = {
        "loaded": [name for name in expected
                   if name in weights and list(weights[name].shape) == list(expected[name].shape)],
        "missing": [name for name in expected if name not in weights],
        "unexpected": [name for name in weights if name not in expected],
        "mismatched": mismatched,
    }
    problems = "; ".join(f"{len(report[kind])} {kind} ({names_preview(report[kind])})"
                         for kind in ("missing", "unexpected", "mismatched") if report[kind])
    where = f"weights {path} do not fit {type(layer).__name__}: {problems}"
    if problems and strict:
        raise UserError(where + "; check that the backbone config matches the pretrained model "
                                "(or pass --pretrained-nonstrict to load only the matching tensors)")
    if problems:
        _LOGGER.warning(where + f"; loading the {len(report['loaded'])} matching tensors")
    loaded = set(report["loaded"])
    # Tensors that do not load keep their current values (and Paddle has nothing to warn about).
    layer.set_state_dict({name: weights[name] if name in loaded else value
                          for name, value in expected.items()})
    return report
