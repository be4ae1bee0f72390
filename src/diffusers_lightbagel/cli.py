"""The `lightbagel` command: generate, edit, ask, convert and train-lora."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from diffusers.utils import logging


logger = logging.get_logger(__name__)

EMBEDDED_MODEL_NOTE = (
    "note: no --model given, so this runs the embedded tiny LightBagel, built locally with no download. "
    "Its weights are random: the output shows that the pipeline runs end to end, not a meaningful image or answer."
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="local pipeline folder or Hugging Face Hub repo id; omit to use the embedded tiny model",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weight dtype"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for the initial noise")


def _add_generation_arguments(parser: argparse.ArgumentParser, guidance_default: float) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt or instruction")
    parser.add_argument("--negative-prompt", default=None, help="what text guidance steers away from")
    parser.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default 50; 8 for the tiny model)")
    parser.add_argument("--height", type=_positive_int, default=None, help="output height in pixels (multiple of 32)")
    parser.add_argument("--width", type=_positive_int, default=None, help="output width in pixels (multiple of 32)")
    parser.add_argument(
        "--guidance-scale", type=float, default=guidance_default, help="text guidance scale; <= 1 turns it off"
    )
    parser.add_argument("--output", "-o", required=True, help="output image path (.png, .jpg, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbagel", description="LightBagel image generation, editing and VQA.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate an image from text")
    _add_model_arguments(generate)
    _add_generation_arguments(generate, guidance_default=4.0)

    edit = commands.add_parser("edit", help="edit an image following an instruction")
    _add_model_arguments(edit)
    edit.add_argument("--image", required=True, help="path of the image to edit")
    _add_generation_arguments(edit, guidance_default=4.0)
    edit.add_argument("--image-guidance-scale", type=float, default=2.0, help="image guidance scale; <= 1 turns it off")

    ask = commands.add_parser("ask", help="answer a question about an image, or a text prompt, with the VLM")
    _add_model_arguments(ask)
    ask.add_argument("--prompt", required=True, help="the question")
    ask.add_argument("--image", default=None, help="path of an image the question is about")
    ask.add_argument("--max-new-tokens", type=_positive_int, default=128, help="maximum number of generated tokens")

    commands.add_parser("convert", help="convert base models or training checkpoints (see `lightbagel convert -h`)", add_help=False)
    commands.add_parser("train-lora", help="train a LoRA (see `lightbagel train-lora -h`)", add_help=False)
    return parser


def _resolve_device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str | None, device: str, dtype_name: str, edit: bool = False):
    """Load a LightBagel pipeline from a folder or repo id, or build the embedded tiny one."""
    import torch

    from . import LightBagelEditPipeline, LightBagelPipeline

    pipeline_cls = LightBagelEditPipeline if edit else LightBagelPipeline
    if model is None:
        from .tiny import build_tiny_components

        print(EMBEDDED_MODEL_NOTE, file=sys.stderr)
        pipe = pipeline_cls(**build_tiny_components(seed=0))
        pipe.default_height = pipe.default_width = 256
        return pipe.to(device), True

    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    # Keep the VAE in float32: the Wan VAE can overflow in float16.
    pipe = pipeline_cls.from_pretrained(model, torch_dtype={"default": dtype, "vae": torch.float32})
    return pipe.to(device), False


def _check_output_path(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: the output file {path!r} exists; pass --overwrite to replace it.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: the output folder {folder!r} does not exist.")


def _save_image_atomically(image, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] or ".png"
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=suffix, prefix=".lightbagel-")
    os.close(handle)
    try:
        image.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _run_generation(args: argparse.Namespace, edit: bool) -> int:
    import torch

    _check_output_path(args.output, args.overwrite)
    device = _resolve_device(args.device)
    pipe, is_embedded = load_pipeline(args.model, device, args.dtype, edit=edit)
    steps = args.steps or (8 if is_embedded else 50)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    kwargs = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        generator=generator,
    )
    if edit:
        from .pipelines.image_utils import to_rgb_image

        kwargs.update(image=to_rgb_image(args.image, "--image"), image_guidance_scale=args.image_guidance_scale)
    image = pipe(**kwargs).images[0]
    _save_image_atomically(image, args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}, {steps} steps, seed {args.seed})")
    if is_embedded:
        print("(random-weight tiny model: the image is noise-like by construction)")
    return 0


def _run_ask(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    pipe, is_embedded = load_pipeline(args.model, device, args.dtype)
    answer = pipe.ask(args.prompt, image=args.image, max_new_tokens=args.max_new_tokens)
    print(answer)
    if is_embedded:
        print("(random-weight tiny model: the generated text is arbitrary tokens by construction)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from .conversion import main as convert_main

        return convert_main(argv[1:])
    if argv and argv[0] == "train-lora":
        from .training import main as train_main

        return train_main(argv[1:])

    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _run_generation(args, edit=False)
    if args.command == "edit":
        return _run_generation(args, edit=True)
    return _run_ask(args)


if __name__ == "__main__":
    sys.exit(main())
