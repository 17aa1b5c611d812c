"""Convert SwAV/ResNet weights (facebookresearch/swav, torchvision, PASSL v1) to a .pdparams file.

    python tools/convert_weights.py swav_800ep_pretrain.pth.tar --output swav_r50.pdparams
    python tools/convert_weights.py swav_800ep_pretrain.pth.tar --output swav_full.pdparams \
        --model swav
    python tools/convert_weights.py swav_800ep_pretrain.pth.tar swav_800ep_eval_linear.pth.tar \\
        --output swav_r50_linear.pdparams --model classifier
    python tools/convert_weights.py deepclusterv2_800ep_pretrain.pth.tar \
        --output deepclusterv2_full.pdparams --model deepclusterv2

    python tools/convert_weights.py epoch_100.pdparams --output swav_full.pdparams --model swav

No torch needed: both PyTorch file formats are read directly, and nothing in the file is run.
PASSL v1 files (its checkpoints epoch_N.pdparams and model state dicts) are recognised by their
layout (or --from passl-v1) and renamed; their tensors are Paddle's already.
backbone: for --pretrained; swav: the whole SwAV model (--load, or to continue pretraining);
deepclusterv2: the whole DeepClusterV2 model (its three prototype heads included);
classifier: trunk + eval_linear classifier (--load ... --evaluate-only). The result is checked
against the model of -c CONFIG (default: the paper's config of the file's width).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, add_config_arguments, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIGS = {1: "swav_r50_100ep.yaml", 2: "swav_r50w2_400ep.yaml",
                    4: "swav_r50w4_400ep.yaml", 5: "swav_r50w5_400ep.yaml"}
ORIGINS = ("auto", "pytorch", "passl-v1")
LINEAR_CONFIGS = {1: "swav_clas_r50.yaml", 2: "swav_clas_r50w2.yaml",
                  4: "swav_clas_r50w4.yaml", 5: "swav_clas_r50w5.yaml"}


#: The published DeepCluster-v2 models are all ResNet-50 with 3 x 3000 prototypes.
DEEPCLUSTERV2_CONFIG = os.path.join("deepclusterv2", "deepclusterv2_r50_800ep.yaml")


def default_config(target, width):
    """The paper's config for a ResNet-50 of ``width`` (width 1 when it is none of 1/2/4/5)."""
    if target == "deepclusterv2":
        return os.path.relpath(os.path.join(ROOT, "configs", DEEPCLUSTERV2_CONFIG))
    configs = PRETRAIN_CONFIGS if target == "swav" else LINEAR_CONFIGS
    return os.path.relpath(os.path.join(ROOT, "configs", "swav", configs.get(width, configs[1])))


def read_passl_v1(path, origin):
    """The PASSL v1 file ``path`` (:class:`passl.models.passl_v1.V1File`), or None when it is
    not one and ``origin`` allows another kind."""
    from passl.io.paddle_file import load_paddle_file
    from passl.models.passl_v1 import recognise
    try:
        v1 = recognise(load_paddle_file(path, "SRC"), path)
    except UserError as error:
        if origin == "passl-v1":
            raise UserError(f"{path}: not a PASSL v1 file ({error})") from None
        # not a paddle.save pickle: a PyTorch archive (its persistent ids are refused here),
        # or no file; the PyTorch reader, as strict, says which
        return None
    if v1 is None and origin == "passl-v1":
        raise UserError(f"{path}: not a PASSL v1 file (neither a checkpoint with a "
                        f"'state_dict' nor a model state dict with neck.projection_neck.*, "
                        f"head.prototypes.* or head.fc_cls.* tensors)")
    return v1


def convert_passl_v1(v1, args):
    """``(state, lines to print)`` of the PASSL v1 file ``v1`` for ``--model``."""
    from passl.config import load_config
    from passl.models.passl_v1 import convert_v1_weights
    if len(args.sources) != 1:
        raise UserError(f"{len(args.sources)} files given: a PASSL v1 file converts alone (its "
                        f"linear-evaluation checkpoints hold the backbone too)")
    # v1's ResNetswav is paddle.vision's ResNet-50 of width 1: the default is that config
    config = args.config or default_config(args.model, 1)
    model_cfg = load_config(config, args.override).model
    state, recognised = convert_v1_weights(v1, args.model, model_cfg, config)
    return state, [recognised, f"checked against {config}"]


def convert_pytorch(args):
    """``(state, lines to print)`` of the PyTorch files ``args.sources`` for ``--model``."""
    from passl.config import load_config
    from passl.models.torch_weights import (convert_torch_weights, describe, read_torch_states,
                                            resnet_width)
    from passl.io.weights import num_values
    states = read_torch_states(args.sources)
    config = args.config or default_config(args.model, resnet_width(states))
    cfg = load_config(config, args.override)
    try:
        state, mapped, left_out = convert_torch_weights(states, args.model, cfg.model, config)
    except UserError as error:
        raise UserError(f"{' + '.join(args.sources)}: {error}") from None
    values = sum(num_values(tensor) for tensor in state.values())
    return state, [f"mapped {len(mapped)} tensors ({values:,} values), checked against "
                   f"{config}:", *describe(state, mapped, left_out)]


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="SRC",
                        help="PyTorch .pth/.pth.tar files (several combine, e.g. a pretrained "
                             "trunk and its eval_linear classifier), or one PASSL v1 file")
    parser.add_argument("--from", dest="origin", choices=ORIGINS, default="auto",
                        help="what wrote SRC (default auto: PASSL v1 files are recognised by "
                             "their layout, anything else is read as PyTorch)")
    parser.add_argument("--output", required=True, help="weights file to write (.pdparams)")
    parser.add_argument("--model", choices=["backbone", "swav", "deepclusterv2", "classifier"],
                        default="backbone",
                        help="what to write (default: backbone)")
    add_config_arguments(parser, required=False,
                         config_help="the config the weights are for (default: configs/swav/ "
                                     "swav_r50*.yaml or swav_clas_r50*.yaml of the file's width; "
                                     "configs/deepclusterv2/deepclusterv2_r50_800ep.yaml for "
                                     "--model deepclusterv2)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.output.endswith(".pdparams"):
        raise UserError(f"--output {args.output}: weights files end in .pdparams")
    from passl.io.checkpoint import write_atomic
    v1 = read_passl_v1(args.sources[0], args.origin) if args.origin != "pytorch" else None
    state, lines = convert_passl_v1(v1, args) if v1 is not None else convert_pytorch(args)
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_atomic(state, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
