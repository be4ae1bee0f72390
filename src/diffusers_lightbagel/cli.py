"""The `lightbagel` command: generate, edit, ask, convert and train-lora."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

from diffusers.utils import logging

from .demo import DEMO_EDIT_GUIDANCE_SCALE, DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS

logger = logging.get_logger(__name__)

EMBEDDED_MODEL_NOTE = (
    "note: no --model given, so this runs the embedded shapes demo: a small LightBagel trained by this package on "
    "synthetic 64x64 scenes of circles, squares and triangles in six colours. It follows captions such as 'a red "
    "circle to the left of a blue square' and edits such as 'make the circle blue'; other prompts give arbitrary "
    "images. Its VLM has random weights, so `ask` answers are arbitrary. See docs/shapes_eval.md."
)

# Sampling settings used when no value is given and a model is named. The embedded demo uses its own settings from
# diffusers_lightbagel.demo, and it samples edits without image guidance.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_IMAGE_GUIDANCE_SCALE = 2.0
DEMO_IMAGE_GUIDANCE_SCALE = 1.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default in --help, unless it is None or the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="local pipeline folder or Hugging Face Hub repo id; omit to use the embedded shapes demo model",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype of the VLM and transformer (auto: bfloat16 on CUDA, float32 on CPU); the VAE stays float32",
    )
    parser.add_argument("--variant", default=None, help="weight file variant to load, e.g. bf16 or fp16")


def _add_generation_arguments(parser: argparse.ArgumentParser, demo_guidance_scale: float) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt or instruction")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the initial noise")
    parser.add_argument("--negative-prompt", default=None, help="what text guidance steers away from")
    parser.add_argument(
        "--steps", type=_positive_int, default=None, help="denoising steps (default: 50; 20 for the embedded demo)"
    )
    parser.add_argument("--height", type=_positive_int, default=None, help="output height in pixels (a multiple of 32, or 16 for the embedded demo; default 1024, or 64 for the demo)")
    parser.add_argument("--width", type=_positive_int, default=None, help="output width in pixels (a multiple of 32, or 16 for the embedded demo; default 1024, or 64 for the demo)")
    parser.add_argument(
        "--guidance-scale",
        type=_finite_float,
        default=None,
        help=f"text guidance scale; <= 1 turns it off (default: 4; {demo_guidance_scale:g} for the embedded demo)",
    )
    parser.add_argument("--output", "-o", required=True, help="output image path (.png, .jpg, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbagel", description="LightBagel image generation, editing and VQA.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate an image from text", formatter_class=_HelpFormatter)
    _add_model_arguments(generate)
    _add_generation_arguments(generate, DEMO_GUIDANCE_SCALE)

    edit = commands.add_parser("edit", help="edit an image following an instruction", formatter_class=_HelpFormatter)
    _add_model_arguments(edit)
    edit.add_argument("--image", required=True, help="path of the image to edit")
    _add_generation_arguments(edit, DEMO_EDIT_GUIDANCE_SCALE)
    edit.add_argument(
        "--image-guidance-scale",
        type=_finite_float,
        default=None,
        help="image guidance scale; <= 1 turns it off (default: 2; 1 for the embedded demo)",
    )

    ask = commands.add_parser(
        "ask", help="answer a question about an image, or a text prompt, with the VLM", formatter_class=_HelpFormatter
    )
    _add_model_arguments(ask)
    ask.add_argument("--prompt", required=True, help="the question")
    ask.add_argument("--image", default=None, help="path of an image the question is about")
    ask.add_argument("--max-new-tokens", type=_positive_int, default=128, help="maximum number of generated tokens")

    commands.add_parser("convert", help="convert base models or training checkpoints (see `lightbagel convert -h`)", add_help=False)
    commands.add_parser("train-lora", help="train a LoRA (see `lightbagel train-lora -h`)", add_help=False)
    return parser


def _resolve_device(name: str | None) -> str:
    import torch

    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {name} was requested, but torch sees no CUDA device; use --device cpu.")
    return name


class CommandError(Exception):
    """An error in the command's arguments, printed as one line without a traceback."""


def load_pipeline(model: str | None, device: str, dtype_name: str, edit: bool = False, variant: str | None = None):
    """Load a LightBagel pipeline from a folder or repo id, or the embedded shapes demo when `model` is None.

    Returns the pipeline and whether it is the embedded demo.
    """
    import torch

    from . import LightBagelEditPipeline, LightBagelPipeline

    pipeline_cls = LightBagelEditPipeline if edit else LightBagelPipeline
    if model is None:
        from .demo import load_demo_pipeline

        print(EMBEDDED_MODEL_NOTE, file=sys.stderr)
        return load_demo_pipeline(edit=edit).to(device), True

    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    # Keep the VAE in float32: the Wan VAE can overflow in float16.
    if not os.path.isdir(model) and (os.path.isabs(model) or model.startswith(".") or model.count("/") > 1):
        raise CommandError(f"--model {model!r} is neither an existing folder nor a Hub repo id (name or org/name).")
    pipe = pipeline_cls.from_pretrained(model, dtype={"default": dtype, "vae": torch.float32}, variant=variant)
    return pipe.to(device), False


def _check_output_path(path: str, overwrite: bool) -> None:
    import PIL.Image

    if os.path.exists(path) and not overwrite:
        raise CommandError(f"the output file {path!r} exists; pass --overwrite to replace it.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"the output folder {folder!r} does not exist.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in PIL.Image.registered_extensions():
        raise CommandError(
            f"the output file {path!r} has the extension {extension!r}, which PIL cannot write; use .png or .jpg."
        )


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
    source_image = None
    if edit:
        from .pipelines.image_utils import to_rgb_image

        source_image = to_rgb_image(args.image, "input")
    device = _resolve_device(args.device)
    pipe, is_embedded = load_pipeline(args.model, device, args.dtype, edit=edit, variant=args.variant)
    steps, guidance_scale, image_guidance_scale = _sampling_settings(args, edit, is_embedded)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    kwargs = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
    )
    if edit:
        kwargs.update(image=source_image, image_guidance_scale=image_guidance_scale)
    if is_embedded:
        # The demo's ShapesEval numbers were measured with guidance over the whole schedule.
        kwargs.update(guidance_interval=(0.0, 1.0))
    image = pipe(**kwargs).images[0]
    _save_image_atomically(image, args.output)
    print(f"wrote {args.output} ({image.width}x{image.height}, {steps} steps, seed {args.seed})")
    return 0


def _sampling_settings(args: argparse.Namespace, edit: bool, is_embedded: bool) -> tuple[int, float, float | None]:
    """Return steps, guidance scale and image guidance scale, filling what the user left out with defaults."""
    demo_guidance = DEMO_EDIT_GUIDANCE_SCALE if edit else DEMO_GUIDANCE_SCALE
    steps = args.steps or (DEMO_NUM_INFERENCE_STEPS if is_embedded else DEFAULT_STEPS)
    guidance_scale = args.guidance_scale
    if guidance_scale is None:
        guidance_scale = demo_guidance if is_embedded else DEFAULT_GUIDANCE_SCALE
    image_guidance_scale = getattr(args, "image_guidance_scale", None)
    if edit and image_guidance_scale is None:
        image_guidance_scale = DEMO_IMAGE_GUIDANCE_SCALE if is_embedded else DEFAULT_IMAGE_GUIDANCE_SCALE
    return steps, guidance_scale, image_guidance_scale


def _printable(text: str) -> str:
    """Escape control characters other than newlines and tabs, so that generated text cannot garble a terminal."""
    return "".join(char if char.isprintable() or char in "\n\t" else f"\\x{ord(char):02x}" for char in text)


def _run_ask(args: argparse.Namespace) -> int:
    image = None
    if args.image is not None:
        from .pipelines.image_utils import to_rgb_image

        image = to_rgb_image(args.image, "input")
    device = _resolve_device(args.device)
    pipe, is_embedded = load_pipeline(args.model, device, args.dtype, variant=args.variant)
    answer = pipe.ask(args.prompt, image=image, max_new_tokens=args.max_new_tokens)
    print(_printable(answer))
    if is_embedded:
        print("(the embedded demo's VLM has random weights: the generated text is arbitrary by construction)", file=sys.stderr)
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
    try:
        if args.command == "generate":
            return _run_generation(args, edit=False)
        if args.command == "edit":
            return _run_generation(args, edit=True)
        return _run_ask(args)
    except (CommandError, ValueError, TypeError, OSError, FloatingPointError) as error:
        # Expected failures (bad arguments, missing files, unloadable models) print one line; set
        # LIGHTBAGEL_TRACEBACK=1 to see the traceback instead.
        if os.environ.get("LIGHTBAGEL_TRACEBACK") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
