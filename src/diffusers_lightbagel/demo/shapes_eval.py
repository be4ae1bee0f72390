"""ShapesEval: a numpy detector for the shapes demo, and scores for generated and edited images against prompts.

The detector labels each pixel with its nearest palette colour, or as background near the white background. The
4-connected components of one colour, above a minimum area, are the objects. A component's shape comes from
geometry (how full the corners of its bounding box are, and how much wider its bottom quarter is than its top
quarter). Its position is the anchor nearest to its centroid and its size follows from the longer side of its
bounding box. Text-to-image prompts are scored per attribute (colour, shape, count, position, size) and as a
whole, as GenEval does for real images. An edit counts as a success when the output's objects are exactly the
target scene's, and the PSNR between source and output outside the edited object measures how much of the rest
stayed.

`python -m diffusers_lightbagel.demo.shapes_eval` prints the table for the shipped demo model.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from . import DEMO_EDIT_GUIDANCE_SCALE, DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS, shapes


# Minimum RGB distance from the background for a pixel to be foreground.
FOREGROUND_DISTANCE = 120.0
# Components smaller than this fraction of the image are noise.
MIN_AREA_FRACTION = 0.006
# Longer bounding-box side, as a fraction of the image side, between "small" and "large".
SIZE_THRESHOLD = (shapes.SIZES["small"] + shapes.SIZES["large"]) / 2
# Horizontal or vertical gap, as a fraction of the image side, that a relation ("to the left of", "above") needs.
RELATION_MARGIN = 0.1
# Pixels around an edited object's bounding box that the edit may also change.
EDIT_MARGIN = 2


@dataclass(frozen=True)
class Detection:
    """One object found in an image; coordinates are fractions of the image side."""

    color: str
    shape: str
    size: str
    position: str
    center_x: float
    center_y: float
    area: int
    box: tuple[int, int, int, int]  # (top, left, bottom, right), inclusive pixel indices


def _connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """Return the 4-connected components of a boolean mask, each as an (n, 2) array of (row, column) indices."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for row, column in zip(*np.nonzero(mask)):
        if seen[row, column]:
            continue
        seen[row, column] = True
        queue = deque([(row, column)])
        pixels = []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(np.array(pixels))
    return components


def classify_shape(component: np.ndarray) -> str:
    """Name the shape of a component mask ((height, width) boolean, cropped to its bounding box)."""
    height, width = component.shape
    quarter_rows = max(1, height // 4)
    top_width = component[:quarter_rows].sum(axis=1).mean()
    bottom_width = component[-quarter_rows:].sum(axis=1).mean()
    if top_width < 0.6 * max(bottom_width, 1e-6):
        return "triangle"
    corner_height, corner_width = max(1, round(height * 0.2)), max(1, round(width * 0.2))
    corners = [
        component[:corner_height, :corner_width],
        component[:corner_height, -corner_width:],
        component[-corner_height:, :corner_width],
        component[-corner_height:, -corner_width:],
    ]
    corner_fill = float(np.mean([corner.mean() for corner in corners]))
    return "square" if corner_fill > 0.6 else "circle"


def _nearest(value: np.ndarray, anchors: dict) -> str:
    names = list(anchors)
    distances = [float(np.sum((value - np.asarray(anchors[name], dtype=np.float64)) ** 2)) for name in names]
    return names[int(np.argmin(distances))]


def label_pixels(pixels: np.ndarray) -> np.ndarray:
    """Return a (height, width) array of palette indices (`shapes.COLORS` order), -1 for background pixels.

    A pixel is background when it is within `FOREGROUND_DISTANCE` of the background colour, or nearer to it than to
    every palette colour. Any other pixel takes the nearest palette colour.
    """
    colors = np.asarray([shapes.BACKGROUND] + [shapes.PALETTE[name] for name in shapes.COLORS], dtype=np.float64)
    distances = np.linalg.norm(pixels[:, :, None, :] - colors[None, None], axis=3)
    labels = distances.argmin(axis=2) - 1
    labels[distances[:, :, 0] <= FOREGROUND_DISTANCE] = -1
    return labels


def detect(image) -> list[Detection]:
    """Find the objects of an RGB image (PIL image or (height, width, 3) uint8 array).

    Each object is a 4-connected component of pixels of one palette colour, so two touching objects of different
    colours stay apart. The detections are ordered by centroid row, then column.
    """
    pixels = shapes.to_array(image) if not isinstance(image, np.ndarray) else image
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"detect needs an RGB image of shape (height, width, 3); got shape {pixels.shape}.")
    pixels = pixels.astype(np.float64)
    height, width = pixels.shape[:2]
    labels = label_pixels(pixels)

    detections = []
    min_area = MIN_AREA_FRACTION * height * width
    for color_index, color in enumerate(shapes.COLORS):
        for component in _connected_components(labels == color_index):
            if len(component) < min_area:
                continue
            rows, columns = component[:, 0], component[:, 1]
            top, left, bottom, right = rows.min(), columns.min(), rows.max(), columns.max()
            crop = np.zeros((bottom - top + 1, right - left + 1), dtype=bool)
            crop[rows - top, columns - left] = True
            center_x, center_y = (columns.mean() + 0.5) / width, (rows.mean() + 0.5) / height
            side = max(crop.shape[0] / height, crop.shape[1] / width)
            detections.append(
                Detection(
                    color=color,
                    shape=classify_shape(crop),
                    size="large" if side > SIZE_THRESHOLD else "small",
                    position=_nearest(np.array([center_x, center_y]), shapes.POSITIONS),
                    center_x=float(center_x),
                    center_y=float(center_y),
                    area=len(component),
                    box=(int(top), int(left), int(bottom), int(right)),
                )
            )
    detections = _drop_fringes(detections)
    return sorted(detections, key=lambda detection: (detection.center_y, detection.center_x))


def _boxes_touch(first: Detection, second: Detection) -> bool:
    top, left, bottom, right = first.box
    other_top, other_left, other_bottom, other_right = second.box
    return top <= other_bottom + 1 and other_top <= bottom + 1 and left <= other_right + 1 and other_left <= right + 1


def _drop_fringes(detections: list[Detection]) -> list[Detection]:
    """Drop components that touch the box of a component more than twice their area.

    A blurred edge can take a neighbouring palette colour (a purple rim on a blue square). Objects of a scene never
    touch each other's boxes, so only such rims are dropped.
    """
    return [
        detection
        for detection in detections
        if not any(
            other is not detection and other.area > 2 * detection.area and _boxes_touch(detection, other)
            for other in detections
        )
    ]


def _object_matches(expected: shapes.Shape, detection: Detection, check: set[str]) -> bool:
    return all(
        getattr(expected, name) is None or getattr(expected, name) == getattr(detection, name) for name in check
    )


def _relation_holds(relation, detections: list[Detection]) -> bool:
    if relation is None:
        return True
    kind, first, second = relation
    if kind == "left_of":
        return detections[first].center_x < detections[second].center_x - RELATION_MARGIN
    return detections[first].center_y < detections[second].center_y - RELATION_MARGIN


def _assignment_exists(objects, relation, detections: list[Detection], check: set[str]) -> bool:
    """Check whether the detections can be matched one-to-one to the objects on the checked attributes and the relation."""
    if len(detections) != len(objects):
        return False
    for order in itertools.permutations(detections):
        if all(_object_matches(item, found, check) for item, found in zip(objects, order)):
            if "position" not in check or _relation_holds(relation, list(order)):
                return True
    return False


def score_prompt(prompt: shapes.Prompt, detections: list[Detection]) -> dict[str, bool]:
    """Score one generated image against its prompt: one boolean per checked attribute, and "overall".

    "count" needs exactly as many objects as requested. "colour" and "shape" need the detected colours (shapes) to
    be the requested ones. "position" and "size" are checked only where the prompt states them, on objects matched
    by colour and shape. "overall" needs one match of every object on every stated attribute, with no extra object.
    """
    objects = prompt.objects
    scores = {
        "count": len(detections) == len(objects),
        "colour": sorted(d.color for d in detections) == sorted(o.color for o in objects),
        "shape": sorted(d.shape for d in detections) == sorted(o.shape for o in objects),
    }
    if prompt.relation is not None or any(item.position is not None for item in objects):
        scores["position"] = _assignment_exists(objects, prompt.relation, detections, {"color", "shape", "position"})
    if any(item.size is not None for item in objects):
        scores["size"] = _assignment_exists(objects, None, detections, {"color", "shape", "size"})
    scores["overall"] = _assignment_exists(
        objects, prompt.relation, detections, {"color", "shape", "size", "position"}
    )
    return scores


def _psnr(first: np.ndarray, second: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return float("inf")
    error = np.mean((first[mask].astype(np.float64) - second[mask].astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * math.log10(255.0**2 / error))


def _scene_box(item: shapes.Shape, image_size: int) -> tuple[int, int, int, int]:
    side = shapes.SIZES[item.size] * image_size
    center_x, center_y = (coordinate * image_size for coordinate in shapes.POSITIONS[item.position])
    return (
        int(math.floor(center_y - side / 2)),
        int(math.floor(center_x - side / 2)),
        int(math.ceil(center_y + side / 2)),
        int(math.ceil(center_x + side / 2)),
    )


def unedited_mask(edit: shapes.EditExample, image_size: int) -> np.ndarray:
    """Return a boolean mask, True outside the edited object's boxes (before and after the edit, with a margin)."""
    mask = np.ones((image_size, image_size), dtype=bool)
    changed = []
    if edit.removed is not None:
        changed.append(edit.source[edit.removed])
    if edit.edited is not None:
        changed.append(edit.target[edit.edited])
    for item in changed:
        top, left, bottom, right = _scene_box(item, image_size)
        mask[
            max(0, top - EDIT_MARGIN) : bottom + EDIT_MARGIN + 1,
            max(0, left - EDIT_MARGIN) : right + EDIT_MARGIN + 1,
        ] = False
    return mask


def score_edit(edit: shapes.EditExample, source, output) -> dict[str, float]:
    """Score one edit: "success" (the output's objects are the target scene's) and "psnr_outside" in dB."""
    output_pixels = shapes.to_array(output) if not isinstance(output, np.ndarray) else output
    source_pixels = shapes.to_array(source) if not isinstance(source, np.ndarray) else source
    detections = detect(output_pixels)
    success = _assignment_exists(edit.target, None, detections, {"color", "shape", "size", "position"})
    mask = unedited_mask(edit, output_pixels.shape[0])
    return {"success": float(success), "psnr_outside": _psnr(source_pixels, output_pixels, mask)}


EVAL_SET_SEED = 20251022


def build_eval_set(num_prompts: int = 250, num_edits: int = 200, seed: int = EVAL_SET_SEED):
    """Return the fixed held-out prompts and edit triplets, spread evenly over the prompt and edit kinds.

    The seed differs from every training seed; the prompt grammar is small, so prompt texts can still also occur
    in training, with other scenes.
    """
    rng = random.Random(seed)
    prompts = [shapes.sample_prompt(rng, shapes.PROMPT_KINDS[i % len(shapes.PROMPT_KINDS)]) for i in range(num_prompts)]
    edits = [shapes.sample_edit(rng, shapes.EDIT_KINDS[i % len(shapes.EDIT_KINDS)]) for i in range(num_edits)]
    return prompts, edits


def summarize_prompts(prompts: list[shapes.Prompt], scores: list[dict[str, bool]]) -> dict[str, float]:
    """Average the per-prompt scores per attribute and per prompt kind."""
    summary = {}
    for name in ("colour", "shape", "count", "position", "size", "overall"):
        values = [score[name] for score in scores if name in score]
        summary[name] = float(np.mean(values)) if values else float("nan")
    for kind in shapes.PROMPT_KINDS:
        values = [score["overall"] for prompt, score in zip(prompts, scores) if prompt.kind == kind]
        summary[f"kind:{kind}"] = float(np.mean(values)) if values else float("nan")
    return summary


def summarize_edits(edits: list[shapes.EditExample], scores: list[dict[str, float]]) -> dict[str, float]:
    """Average the edit scores overall and per edit kind; PSNR values are capped at 60 dB before averaging."""
    summary = {
        "edit_success": float(np.mean([score["success"] for score in scores])),
        "psnr_outside": float(np.mean([min(score["psnr_outside"], 60.0) for score in scores])),
    }
    for kind in shapes.EDIT_KINDS:
        values = [score["success"] for edit, score in zip(edits, scores) if edit.kind == kind]
        summary[f"edit:{kind}"] = float(np.mean(values)) if values else float("nan")
    return summary


def evaluate_images(prompts, prompt_images, edits, edit_images) -> dict[str, float]:
    """Score generated images (one per prompt) and edited images (one per edit triplet)."""
    prompt_scores = [score_prompt(prompt, detect(image)) for prompt, image in zip(prompts, prompt_images)]
    edit_scores = [
        score_edit(edit, shapes.render(edit.source), image) for edit, image in zip(edits, edit_images)
    ]
    return {**summarize_prompts(prompts, prompt_scores), **summarize_edits(edits, edit_scores)}


def disable_fusion(pipe):
    """Return a copy of a pipeline whose fusion blocks are identities: every fusion output projection is zero."""
    transformer = copy.deepcopy(pipe.transformer)
    for block in transformer.fusion_blocks:
        for stream in (block.understanding, block.generation):
            stream.to_out.weight.data.zero_()
            stream.to_out.bias.data.zero_()
    ablated = type(pipe)(**{**pipe.components, "transformer": transformer})
    ablated.set_progress_bar_config(disable=True)
    return ablated


def generate(
    pipe, prompts, num_inference_steps: int, guidance_scale: float, seed: int, guidance_interval=(0.0, 1.0), batch_size=50
):
    """Generate one image per prompt with per-prompt seeds `seed + index`."""
    import torch

    images = []
    for start in range(0, len(prompts), batch_size):
        texts = [prompt.text for prompt in prompts[start : start + batch_size]]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(texts))]
        images += pipe(
            texts,
            height=shapes.IMAGE_SIZE,
            width=shapes.IMAGE_SIZE,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            generator=generators,
        ).images
    return images


def edit_images(
    edit_pipe,
    edits,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    guidance_interval=(0.0, 1.0),
    batch_size=50,
    image_guidance_scale: float = 1.0,
):
    """Edit each triplet's rendered source with its instruction, seeds `seed + index`."""
    import torch

    images = []
    for start in range(0, len(edits), batch_size):
        chunk = edits[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += edit_pipe(
            image=[shapes.render(edit.source) for edit in chunk],
            prompt=[edit.instruction for edit in chunk],
            height=shapes.IMAGE_SIZE,
            width=shapes.IMAGE_SIZE,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            guidance_interval=guidance_interval,
            generator=generators,
        ).images
    return images


def score_pipeline(
    pipe,
    prompts,
    edits,
    num_inference_steps: int = DEMO_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEMO_GUIDANCE_SCALE,
    edit_guidance_scale: float = DEMO_EDIT_GUIDANCE_SCALE,
    image_guidance_scale: float = 1.0,
    guidance_interval=(0.0, 1.0),
    seed: int = 0,
) -> dict[str, float]:
    """Generate an image per prompt and edit each triplet's source with `pipe`'s components, then score both."""
    from ..pipelines.pipeline_lightbagel_edit import LightBagelEditPipeline

    edit_pipe = LightBagelEditPipeline.from_pipe(pipe)
    edit_pipe.set_progress_bar_config(disable=True)
    generated = generate(pipe, prompts, num_inference_steps, guidance_scale, seed, guidance_interval)
    edited = edit_images(
        edit_pipe,
        edits,
        num_inference_steps,
        edit_guidance_scale,
        seed,
        guidance_interval,
        image_guidance_scale=image_guidance_scale,
    )
    return evaluate_images(prompts, generated, edits, edited)


COLUMNS = (
    ("colour", "colour"),
    ("shape", "shape"),
    ("count", "count"),
    ("position", "position"),
    ("size", "size"),
    ("overall", "t2i overall"),
    ("edit_success", "edit success"),
    ("psnr_outside", "PSNR outside (dB)"),
)
KIND_COLUMNS = tuple((f"kind:{kind}", kind) for kind in shapes.PROMPT_KINDS) + tuple(
    (f"edit:{kind}", kind) for kind in shapes.EDIT_KINDS
)


def format_table(rows: dict[str, dict[str, float]], columns=COLUMNS) -> str:
    """Format results as a Markdown table, one row per evaluated model."""
    header = "| model | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|" + " --- |" * (len(columns) + 1)]
    for name, values in rows.items():
        cells = []
        for key, _ in columns:
            value = values.get(key, float("nan"))
            if math.isnan(value):
                cells.append("-")
            elif key == "psnr_outside":
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> dict[str, dict[str, float]]:
    """Evaluate the ground truth, the VAE round trip, the model and the model without fusion; return their rows."""
    import torch

    from . import load_demo_pipeline
    from .train import single_frame_convolutions

    torch.set_num_threads(args.threads)
    prompts, edits = build_eval_set(args.num_prompts, args.num_edits, args.set_seed)
    rows = {}

    truth_rng = random.Random(1)
    truth_prompt_images = [shapes.render(shapes.scene_for_prompt(prompt, truth_rng)) for prompt in prompts]
    truth_edit_images = [shapes.render(edit.target) for edit in edits]
    rows["data generator (ground truth)"] = evaluate_images(prompts, truth_prompt_images, edits, truth_edit_images)

    pipe = load_demo_pipeline(model_dir=args.model)
    pipe.set_progress_bar_config(disable=True)
    with single_frame_convolutions(), torch.no_grad():
        round_trip = [
            pipe.decode_latents(pipe.encode_image_latents(images, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, "cpu"), "pil")
            for images in (truth_prompt_images, truth_edit_images)
        ]
        rows["ground truth through the VAE"] = evaluate_images(prompts, round_trip[0], edits, round_trip[1])

        models = {"LightBagel shapes": pipe}
        if not args.skip_ablation:
            models["same model, fusion disabled"] = disable_fusion(pipe)
        for name, model in models.items():
            started = time.time()
            rows[name] = score_pipeline(
                model,
                prompts,
                edits,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                edit_guidance_scale=args.edit_guidance_scale,
                image_guidance_scale=args.image_guidance_scale,
                guidance_interval=tuple(args.guidance_interval),
                seed=args.seed,
            )
            rows[name]["seconds"] = time.time() - started
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_lightbagel.demo.shapes_eval",
        description="Print the ShapesEval table of the shapes demo model (text-to-image and editing).",
    )
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped demo model)")
    parser.add_argument("--num-prompts", type=int, default=250, help="held-out text-to-image prompts")
    parser.add_argument("--num-edits", type=int, default=200, help="held-out edit triplets")
    parser.add_argument("--steps", type=int, default=DEMO_NUM_INFERENCE_STEPS, help="denoising steps")
    parser.add_argument(
        "--guidance-scale", type=float, default=DEMO_GUIDANCE_SCALE, help="text guidance scale for text-to-image"
    )
    parser.add_argument(
        "--edit-guidance-scale", type=float, default=DEMO_EDIT_GUIDANCE_SCALE, help="text guidance scale for editing"
    )
    parser.add_argument(
        "--image-guidance-scale",
        type=float,
        default=1.0,
        help="image guidance scale for editing (1 or less turns image guidance off)",
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("LOW", "HIGH"),
        help="noise levels (1 is pure noise) between which guidance runs",
    )
    parser.add_argument("--seed", type=int, default=0, help="first sampling seed; image i uses seed + i")
    parser.add_argument(
        "--set-seed",
        type=int,
        default=EVAL_SET_SEED,
        help=f"seed of the prompt and edit set (default {EVAL_SET_SEED}: the held-out set). Another seed gives a "
        "validation set for choosing sampling settings.",
    )
    parser.add_argument("--skip-ablation", action="store_true", help="do not evaluate the fusion-disabled copy")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or args.num_edits < 1 or args.steps < 1:
        raise SystemExit("error: --num-prompts, --num-edits and --steps must be at least 1.")
    rows = run(args)
    print(format_table(rows))
    print()
    print(format_table(rows, KIND_COLUMNS))
    print(
        f"\n{args.num_prompts} prompts, {args.num_edits} edits, {args.steps} steps, guidance {args.guidance_scale} "
        f"(text-to-image) and {args.edit_guidance_scale} (edit), image guidance {args.image_guidance_scale}, "
        f"guidance interval {tuple(args.guidance_interval)}, seed {args.seed}, set seed {args.set_seed}."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
