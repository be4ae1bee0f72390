"""`lightbagel convert base` and `lightbagel convert checkpoint`: argument parsing and output for the command line."""

from __future__ import annotations

import argparse
import sys

from diffusers.utils import logging

from .base import convert_base_models
from .checkpoint import CHECKPOINT_LAYOUTS, convert_training_checkpoint
from .key_maps import ConversionError
from .writer import DTYPE_CHOICES, parse_dtype


logger = logging.get_logger(__name__)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", required=True, help="folder to write the LightBagel pipeline into")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument(
        "--variant", default=None, help="save weights as <name>.<variant>.safetensors, e.g. bf16 (default: no variant)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPE_CHOICES, help="transformer dtype (default auto: as in the source)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightbagel convert",
        description="Convert base models or training checkpoints to a LightBagel pipeline folder."
    )
    commands = parser.add_subparsers(dest="source", required=True)

    base = commands.add_parser("base", help="build an initial LightBagel folder from Qwen2.5-VL and Wan2.2-TI2V-5B")
    base.add_argument(
        "--vlm", required=True, help="Qwen2.5-VL folder in transformers format, with its processor files"
    )
    base.add_argument(
        "--wan",
        required=True,
        help="Wan2.2 DiT: a diffusers Wan pipeline folder, a diffusers transformer/ folder, a Wan release folder, or "
        "a Wan release weights file (.safetensors, .pth, *.index.json)",
    )
    base.add_argument(
        "--wan-vae", default=None, help="Wan2.2 VAE, if --wan lacks it: an AutoencoderKLWan folder or Wan2.2_VAE.pth"
    )
    base.add_argument(
        "--wan-config", default=None, help="Wan release config.json, for a --wan weights file without one beside it"
    )
    base.add_argument(
        "--vae-config", default=None, help="diffusers AutoencoderKLWan config.json, for a Wan release VAE file"
    )
    base.add_argument("--vlm-dtype", default="auto", choices=DTYPE_CHOICES, help="VLM dtype (default auto: as stored)")
    base.add_argument("--vae-dtype", default="auto", choices=DTYPE_CHOICES, help="VAE dtype (default auto: as stored)")
    base.add_argument(
        "--fusion-depth",
        type=float,
        default=0.0,
        help="VLM layer each fusion block reads: 0 the same relative depth, 1 the last layer"
    )
    base.add_argument("--seed", type=int, default=0, help="seed of the re-initialised parameters")
    _add_output_arguments(base)

    checkpoint = commands.add_parser("checkpoint", help="write a training checkpoint into a LightBagel folder")
    checkpoint.add_argument("--base", required=True, help="LightBagel pipeline folder providing VLM, VAE and configs")
    checkpoint.add_argument(
        "--checkpoint",
        required=True,
        help="a .safetensors/.pt/.bin file, a shard index, an accelerate save_state folder or a DeepSpeed ZeRO folder",
    )
    checkpoint.add_argument("--ema", action="store_true", help="convert the EMA weights stored in the checkpoint")
    checkpoint.add_argument(
        "--strip-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="wrapper prefix to remove from keys besides module. and _orig_mod., e.g. model. (repeatable)",
    )
    checkpoint.add_argument(
        "--layout", default="auto", choices=CHECKPOINT_LAYOUTS, help="full transformer or fusion blocks only"
    )
    checkpoint.add_argument("--base-variant", default=None, help="variant of the base folder's weights, if any")
    checkpoint.add_argument("--deepspeed-tag", default=None, help="tag inside a DeepSpeed folder (default: latest)")
    _add_output_arguments(checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `lightbagel convert` with `argv` (the arguments after `convert`); return the exit status."""
    args = build_parser().parse_args(argv)
    logging.set_verbosity_info()
    try:
        if args.source == "base":
            report = convert_base_models(
                args.vlm,
                args.wan,
                args.output,
                wan_vae=args.wan_vae,
                wan_config=args.wan_config,
                vae_config=args.vae_config,
                dtype=parse_dtype(args.dtype),
                vlm_dtype=parse_dtype(args.vlm_dtype, "--vlm-dtype"),
                vae_dtype=parse_dtype(args.vae_dtype, "--vae-dtype"),
                fusion_depth=args.fusion_depth,
                seed=args.seed,
                variant=args.variant,
                overwrite=args.overwrite,
            )
        else:
            report = convert_training_checkpoint(
                args.base,
                args.checkpoint,
                args.output,
                use_ema=args.ema,
                dtype=parse_dtype(args.dtype),
                strip_prefixes=args.strip_prefix,
                layout=args.layout,
                variant=args.variant,
                base_variant=args.base_variant,
                deepspeed_tag=args.deepspeed_tag,
                overwrite=args.overwrite,
            )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.format())
    return 0
