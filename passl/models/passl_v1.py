"""PASSL v1 files (PaddlePaddle/PASSL 1.x) as they are, in our models' names.

What PASSL v1 writes, and so what its users and its SwAV page publish:

- a training checkpoint (``passl/hooks/checkpoint_hook.py``), ``epoch_N.pd`` or
  ``epoch_N.pdparams``: one pickle of ``{'epoch', 'state_dict', 'optimizer', 'lr_scheduler'}``
  (``'lr_sheduer'`` in files from before November 2021) with every Tensor as a NumPy array.
  ``state_dict`` is the whole model's: a SwAV pretraining run (``backbone.*``,
  ``neck.projection_neck.*``, ``head.prototypes.*``) or a linear evaluation
  (``backbone.*``, ``head.fc_cls.*``);
- a weights file of ``tools/extract_weight.py``: ``paddle.save`` of the ``backbone.*``
  tensors, with or without the prefix (our names already: ``--pretrained`` takes it as is);
- ``paddle.save(model.state_dict())``: a whole model without the checkpoint around it.

The files are read by :func:`passl.io.paddle_file.load_paddle_file` (no code from the file
runs); here they are recognised by their layout and renamed by the mappings that live next
to each model (``swav_from_passl_v1``, ``classification_from_passl_v1``,
``resnet_from_passl_v1``). Every tensor is already in Paddle's layout, so values never change.
"""
import sys
from collections import Counter, OrderedDict

import numpy as np
import paddle

from passl.errors import UserError
from passl.io.foreign_layouts import register_layout
from passl.models.architectures.classification import classification_from_passl_v1
from passl.models.architectures.swav import swav_from_passl_v1
from passl.models.torch_weights import check_fits, expected_shapes

#: names that only a PASSL v1 SwAV or classifier has (our layers are neck.mlp, head.heads, fc)
V1_ONLY_PREFIXES = ("neck.projection_neck.", "head.prototypes.", "head.fc_cls.")
BACKBONE = "backbone."
#: what ``state_dict`` holds -> how messages call it
KINDS = {"swav": "SwAV pretraining", "classifier": "linear-evaluation",
         "backbone": "backbone-only"}


class V1File:
    """A PASSL v1 file's model tensors, and what it was.

    Attributes:
        state: ``{v1 name: tensor}``, the model's state dict as v1 saved it.
        epoch: epochs trained (checkpoints that say), else None.
        checkpoint: a training checkpoint (else a bare state dict).
        kind: ``swav``, ``classifier`` or ``backbone`` (see :data:`KINDS`).
        what: how messages name the file, e.g. ``"--load epoch_100.pdparams"``.
    """

    def __init__(self, state, epoch, what, checkpoint):
        self.state, self.epoch, self.what, self.checkpoint = state, epoch, what, checkpoint
        names = list(state)
        if any(name.startswith(("neck.projection_neck.", "head.prototypes.")) for name in names):
            self.kind = "swav"
        elif any(name.startswith("head.fc_cls.") for name in names):
            self.kind = "classifier"
        else:
            self.kind = "backbone"

    def description(self):
        """``a PASSL v1 SwAV pretraining checkpoint (epoch 100)`` and the like."""
        container = "checkpoint" if self.checkpoint else "state dict"
        epoch = f" (epoch {self.epoch})" if self.epoch is not None else ""
        return f"a PASSL v1 {KINDS[self.kind]} {container}{epoch}"


def recognise(obj, what):
    """A :class:`V1File` when ``obj`` (what ``load_paddle_file`` returned) is laid out as
    PASSL v1 writes its files, else None.

    A checkpoint is a dict with a ``state_dict`` dict and no ``model``/``kind`` (our own
    checkpoints have both); a bare state dict is recognised by a name only v1 models have.
    A backbone-only state dict is not a v1 file here: it has our names already.
    """
    if not isinstance(obj, dict) or "kind" in obj or "model" in obj:
        return None
    if isinstance(obj.get("state_dict"), dict):
        epoch = obj.get("epoch")
        return V1File(obj["state_dict"], epoch if isinstance(epoch, int) else None, what,
                      checkpoint=True)
    if any(isinstance(name, str) and name.startswith(V1_ONLY_PREFIXES) for name in obj):
        return V1File(obj, None, what, checkpoint=False)
    return None


def our_name(name):
    """Our name for the v1 tensor ``name`` in whichever of our models has that layer."""
    return swav_from_passl_v1(name) or classification_from_passl_v1(name)


def _renamed_part(old, new):
    """``(old prefix, new prefix)`` after dropping the dotted suffix both names share."""
    old_parts, new_parts = old.split("."), new.split(".")
    while old_parts and new_parts and old_parts[-1] == new_parts[-1]:
        old_parts.pop()
        new_parts.pop()
    return ".".join(old_parts), ".".join(new_parts)


def summarise_renames(pairs):
    """``pairs`` of (v1 name, ours) as one short phrase: unchanged names counted per top-level
    prefix, renamed ones as ``old.* -> new.* (count)``."""
    groups = Counter()
    for old, new in pairs:
        if old == new:
            groups[f"{old.split('.')[0]}.* as they are"] += 1
        else:
            old_part, new_part = _renamed_part(old, new)
            groups[f"{old_part}.* -> {new_part}.*" if new_part else
                   f"{old_part}.* without the prefix"] += 1
    return ", ".join(f"{group} ({count})" for group, count in groups.items())


def _unknown_error(v1, unknown):
    shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    return UserError(f"{v1.what}: {v1.description()} with {len(unknown)} tensors that fit no "
                     f"layer of our SwAV or Classification models ({shown}); PASSL v1 files of "
                     f"SwAV (ResNetswav, SwAVNeck, SwAVHead) and of its linear evaluation "
                     f"(ClasHead) convert")


#: where each kind of v1 file loads whole (``--load``)
LOADS_INTO = {"swav": "a SwAV config (e.g. configs/swav/swav_r50_100ep.yaml)",
              "classifier": "a Classification config (e.g. configs/swav/swav_clas_r50.yaml)"}


def model_state(v1, expected=None):
    """``(state dict in our names, one line saying what was recognised and mapped)`` of the
    whole model in ``v1`` (``--load``, ``tools/extract_weight.py``).

    ``expected``: the names of the model it must fill; a SwAV file for a classifier (or the
    reverse) is then refused with the config it does load into.
    """
    pairs = [(name, our_name(name)) for name in v1.state]
    unknown = [name for name, ours in pairs if ours is None]
    if unknown:
        raise _unknown_error(v1, unknown)
    state = OrderedDict((ours, v1.state[name]) for name, ours in pairs)
    missing = [name for name in expected or () if name not in state]
    if missing and v1.kind in LOADS_INTO:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{v1.what}: {v1.description()} does not fill this config's model "
                        f"({len(missing)} tensors missing: {shown}); it loads into "
                        f"{LOADS_INTO[v1.kind]}, and --pretrained takes its backbone")
    return state, f"{v1.what}: {v1.description()}; mapped {summarise_renames(pairs)}"


def backbone_state(v1):
    """``(backbone tensors without the prefix, one line)``: what ``--pretrained`` loads."""
    pairs = [(name, our_name(name)[len(BACKBONE):]) for name in v1.state
             if (our_name(name) or "").startswith(BACKBONE)]
    if not pairs:
        raise UserError(f"{v1.what}: {v1.description()} without backbone.* tensors; pass a "
                        f"PASSL v1 SwAV or linear-evaluation checkpoint")
    left_out = len(v1.state) - len(pairs)
    note = f"; left out the other {left_out} (not backbone)" if left_out else ""
    state = OrderedDict((ours, v1.state[name]) for name, ours in pairs)
    return state, (f"{v1.what}: {v1.description()}; took "
                   f"{summarise_renames(pairs)}{note}")


def map_for_target(v1, target):
    """``(converted, mapped, left_out)`` for ``tools/convert_weights.py --model target``, in
    the form :func:`passl.models.torch_weights.map_torch_state` returns."""
    if target == "backbone":
        state, _ = backbone_state(v1)
        mapped = [(BACKBONE + name, name) for name in state]
        left_out = [name for name in v1.state if not name.startswith(BACKBONE)]
        return state, mapped, ({"not part of --model backbone": left_out} if left_out else {})
    if target == "classifier" and v1.kind == "swav":
        raise UserError(f"{v1.what}: {v1.description()} has no linear classifier "
                        f"(head.fc_cls); convert the linear-evaluation checkpoint with --model "
                        f"classifier, or this one with --model backbone (then train the linear "
                        f"layer with --pretrained)")
    if target == "swav" and v1.kind != "swav":
        raise UserError(f"{v1.what}: {v1.description()} has no SwAV projection head or "
                        f"prototypes; convert it with --model classifier or --model backbone")
    state, _ = model_state(v1)
    mapped = list(zip(v1.state, state))
    return state, mapped, {}


def convert_v1_weights(v1, target, model_cfg, config):
    """Map ``v1`` for ``target`` and check it against the model of ``model_cfg``.

    Returns:
        ``(state to paddle.save in the model's order, one line saying what was mapped)``.
    """
    converted, mapped, left_out = map_for_target(v1, target)
    shapes = expected_shapes(model_cfg, target)
    check_fits(converted, mapped, shapes, target, model_cfg, config)
    state = OrderedDict((name, paddle.to_tensor(np.asarray(converted[name])))
                        for name in shapes)
    dropped = "".join(f"; left out {len(names)} {reason}" for reason, names in left_out.items())
    return state, (f"{v1.what}: {v1.description()}; mapped {summarise_renames(mapped)}"
                   f"{dropped}")


# The checkpoint and weights readers (passl/io) recognise v1 files through this module.
register_layout(sys.modules[__name__])
