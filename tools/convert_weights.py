"""Convert PyTorch SwAV/ResNet weights (facebookresearch/swav, torchvision) to a .pdparams file.

    python tools/convert_weights.py swav_800ep_pretrain.pth.tar --output swav_r50.pdparams
    python tools/convert_weights.py swav_800ep_pretrain.pth.tar --output swav_full.pdparams \
        --model swav
    python tools/convert_weights.py swav_800ep_pretrain.pth.tar swav_800ep_eval_linear.pth.tar \\
        --output swav_r50_linear.pdparams --model classifier
    python tools/convert_weights.py deepclusterv2_800ep_pretrain.pth.tar \
        --output deepclusterv2_full.pdparams --model deepclusterv2

No torch needed: both PyTorch file formats are read directly, and nothing in the file is run.
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


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="SRC",
                        help="PyTorch .pth/.pth.tar files (several combine, e.g. a pretrained "
                             "trunk and its eval_linear classifier)")
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
    from passl.config import load_config
    from passl.engine.checkpoint import write_atomic
    from passl.models.torch_weights import (convert_torch_weights, describe, read_torch_states,
                                            resnet_width)
    from passl.models.weights import num_values
    states = read_torch_states(args.sources)
    config = args.config or default_config(args.model, resnet_width(states))
    cfg = load_config(config, args.override)
    try:
        state, mapped, left_out = convert_torch_weights(states, args.model, cfg.model, config)
    except UserError as error:
        raise UserError(f"{' + '.join(args.sources)}: {error}") from None
    values = sum(num_values(tensor) for tensor in state.values())
    print(f"mapped {len(mapped)} tensors ({values:,} values), checked against "
          f"{config}:")
    print("\n".join(describe(state, mapped, left_out)))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_atomic(state, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
