"""PyTorch checkpoints into our models' state dicts (``tools/convert_weights.py``).

The files are read without torch (:mod:`passl.io.torch_file`); each model file says how the
reference's names map onto its own (``resnet_from_torch``, ``swav_from_torch``,
``classification_from_torch``); :mod:`passl.models.torch_names` turns each tensor into
Paddle's layout. The result is checked tensor by tensor against the model a config builds,
so a file that converts is one that model loads.
"""
from collections import OrderedDict

import paddle

from passl.errors import UserError
from passl.io.torch_file import read_torch_file, torch_state_dict
from passl.io.weights import names_preview
from passl.models.architectures.classification import classification_from_torch
from passl.models.architectures.swav import swav_from_torch
from passl.models.backbones.resnet import resnet_from_torch
from passl.models.registry import BACKBONES, MODELS
from passl.models.torch_names import DROPPED_BUFFER, paddle_layout

#: ``--model`` -> how a reference tensor name becomes ours in that model.
TARGETS = {
    "swav": swav_from_torch,              # whole SwAV model: --load, or continue pretraining
    # whole DeepClusterV2 model: the reference names its network as SwAV's, with three
    # prototype heads (prototypes.prototypes0..2, MultiPrototypes)
    "deepclusterv2": swav_from_torch,
    "classifier": classification_from_torch,  # trunk + linear classifier: --evaluate-only
    "backbone": resnet_from_torch,        # trunk alone, no prefix: --pretrained
}
STEM = "conv1.weight"


def read_torch_states(paths):
    """The state dicts of ``paths`` merged into one ``{reference name: array}``.

    Several files combine, e.g. a pretrained trunk and the eval_linear classifier trained on it;
    a name in two files is an error.
    """
    merged, origin = OrderedDict(), {}
    for path in paths:
        for name, array in torch_state_dict(read_torch_file(path), path).items():
            if name in merged:
                raise UserError(f"{name} is in both {origin[name]} and {path}; pass files "
                                f"that hold different tensors (a trunk and its classifier)")
            merged[name], origin[name] = array, path
    return merged


def resnet_width(state, base_width=64):
    """The ``width_multiplier`` of the trunk in a reference state dict (conv1's channels / 64)."""
    stem = state.get(STEM)
    return None if stem is None or stem.ndim == 0 else stem.shape[0] / base_width


def map_torch_state(state, target):
    """Rename and re-lay the tensors of a reference state dict for ``target`` (a TARGETS key).

    Returns:
        ``(converted, mapped, left_out)``: ``{our name: array}``, ``[(reference name, ours)]``
        and ``{reason: [reference names]}`` for the known tensors ``target`` does not hold.

    Raises:
        UserError: naming the tensors no model here has (not a ResNet/SwAV/classifier file).
    """
    converted, mapped, left_out, unknown = OrderedDict(), [], {}, []
    for name, array in state.items():
        if name.rpartition(".")[2] == DROPPED_BUFFER:
            left_out.setdefault(f"{DROPPED_BUFFER} (BatchNorm update counters; Paddle keeps "
                                f"none)", []).append(name)
            continue
        ours = TARGETS[target](name)
        if ours is None:
            if any(known(name) for known in TARGETS.values()):
                left_out.setdefault(f"not part of --model {target}", []).append(name)
            else:
                unknown.append(name)
            continue
        converted[ours] = paddle_layout(array)
        mapped.append((name, ours))
    if unknown:
        raise UserError(f"{len(unknown)} tensors fit no layer of a ResNet, SwAV or linear "
                        f"classifier: {names_preview(unknown)}; this converts the ResNet/SwAV "
                        f"files of facebookresearch/swav and torchvision ResNets")
    return converted, mapped, left_out


def expected_shapes(model_cfg, target):
    """``{name: shape}`` of the model ``model_cfg`` builds for ``target`` (no weights allocated)."""
    with paddle.LazyGuard():
        if target == "backbone":
            model = BACKBONES.build(model_cfg.backbone)
        else:
            model = MODELS.build(model_cfg)
    return OrderedDict((name, list(t.shape)) for name, t in model.state_dict().items())


def check_fits(converted, mapped, shapes, target, model_cfg, config):
    """Every tensor of the model filled, with its shape; errors name the tensors and the fix."""
    stem = STEM if target == "backbone" else "backbone." + STEM
    if stem in converted and stem in shapes and list(converted[stem].shape) != shapes[stem]:
        channels, built = converted[stem].shape[0], shapes[stem][0]
        ours = model_cfg.backbone.get("width_multiplier", 1)
        fits = channels * ours / built
        fix = (f"the file fits width_multiplier {int(fits)}: pass a config with "
               f"model.backbone.width_multiplier: {int(fits)} (-c, or -o)"
               if fits >= 1 and float(fits).is_integer() else
               "pass the config the file was trained with (-c)")
        raise UserError(f"the file's ResNet has {channels} channels in conv1, {config} builds "
                        f"{built} (width_multiplier {ours}); {fix}")
    source = {ours: name for name, ours in mapped}
    unexpected = [f"{source[n]} -> {n}" for n in converted if n not in shapes]
    if unexpected:
        raise UserError(f"{len(unexpected)} tensors fit nothing in the model of {config}: "
                        f"{names_preview(unexpected)}; pass the config the file was trained "
                        f"with (-c)")
    mismatched = [f"{source[n]} {list(converted[n].shape)} -> {n} {shape}"
                  for n, shape in shapes.items()
                  if n in converted and list(converted[n].shape) != shape]
    if mismatched:
        raise UserError(f"{len(mismatched)} tensors have another shape than in the model of "
                        f"{config} (Paddle layout): {names_preview(mismatched)}; pass the "
                        f"config the file was trained with (-c)")
    missing = [n for n in shapes if n not in converted]
    if missing:
        hint = {
            "classifier": "a classifier needs the trunk and its eval_linear classifier: pass "
                          "both files (PRETRAIN.pth.tar EVAL_LINEAR.pth.tar), or convert "
                          "--model backbone and train the linear layer with --pretrained",
            "swav": "a backbone-only file converts with --model backbone",
        }.get(target, "the file holds no complete ResNet trunk")
        raise UserError(f"{len(missing)} tensors of the model of {config} are not in the file: "
                        f"{names_preview(missing)}; {hint}")


def convert_torch_weights(torch_state, target, model_cfg, config):
    """Map a reference state dict for ``target`` and check it against ``model_cfg``.

    Args:
        torch_state: ``{reference name: array}`` (see :func:`read_torch_states`).
        target: ``swav``, ``classifier`` or ``backbone``.
        model_cfg: the ``model`` block of the config the result must load into.
        config: how messages name that config (its path).

    Returns:
        ``(state, mapped, left_out)``: the state dict to ``paddle.save``, in the model's order,
        and what :func:`map_torch_state` reports.
    """
    converted, mapped, left_out = map_torch_state(torch_state, target)
    shapes = expected_shapes(model_cfg, target)
    check_fits(converted, mapped, shapes, target, model_cfg, config)
    state = OrderedDict((name, paddle.to_tensor(converted[name])) for name in shapes)
    return state, mapped, left_out


def describe(state, mapped, left_out):
    """What a conversion did, as lines to print: trunk tensors counted, the others listed."""
    trunk = {name for name, _ in mapped if resnet_from_torch(name)}
    lines = [f"  {len(trunk)} ResNet trunk tensors under the same names (BatchNorm "
             f"running_mean/running_var -> _mean/_variance)"]
    for name, ours in mapped:
        if name not in trunk:
            layout = " (transposed [out, in] -> [in, out])" if len(state[ours].shape) == 2 else ""
            lines.append(f"  {name} -> {ours}{layout}")
    for reason, names in left_out.items():
        lines.append(f"left out {len(names)}, {reason}: {names_preview(names)}")
    return lines
