"""Synthetic shapes: scenes of one to three coloured shapes, their captions and edit triplets, from a seed.

A scene is a list of `Shape`s drawn on a white square canvas. Every object sits at one of five anchor positions
(left, right, top, bottom, centre). Scenes with several objects place them along one line (left, centre, right or
top, centre, bottom), so objects never overlap. The same seed always gives the same scenes, captions and images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
import PIL.Image
import PIL.ImageDraw


IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# Side of the bounding box of each size, as a fraction of the image side.
SIZES = {"small": 0.17, "large": 0.25}
# Centre of each position, as fractions of the image side (x, y).
POSITIONS = {
    "left": (0.19, 0.5),
    "right": (0.81, 0.5),
    "top": (0.5, 0.19),
    "bottom": (0.5, 0.81),
    "centre": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Lines along which several objects are placed, in reading order (left to right, top to bottom).
LINES = (("left", "centre", "right"), ("top", "centre", "bottom"))
NUMBER_WORDS = {2: "two", 3: "three"}
PROMPT_KINDS = ("single", "attributes", "position", "relation", "count")
EDIT_KINDS = ("recolor", "remove", "add", "move")


@dataclass(frozen=True)
class Shape:
    """One object of a scene."""

    color: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Prompt:
    """A caption and the objects it requests.

    `objects` are the requested objects; in each, `size` and `position` are None where the caption leaves them
    free. `relation` is ("left_of" or "above", index a, index b) when the caption places object a relative to b.
    """

    text: str
    kind: str
    objects: tuple[Shape, ...]
    relation: tuple[str, int, int] | None = None


@dataclass(frozen=True)
class EditExample:
    """An edit triplet: source scene, instruction, target scene, and which object the edit concerns.

    `edited` is the index of the changed object in `target` (None for a removal), and `removed` the index of the
    removed or changed object in `source` (None for an addition).
    """

    source: tuple[Shape, ...]
    instruction: str
    target: tuple[Shape, ...]
    kind: str
    edited: int | None = None
    removed: int | None = None
    unchanged: tuple[Shape, ...] = field(default=())


def _plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render(scene: tuple[Shape, ...] | list[Shape], image_size: int = IMAGE_SIZE) -> PIL.Image.Image:
    """Draw a scene as an RGB image of `image_size` x `image_size` pixels."""
    image = PIL.Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for item in scene:
        if item.shape not in SHAPES or item.color not in PALETTE:
            raise ValueError(f"Unknown shape {item.shape!r} or colour {item.color!r}; allowed: {SHAPES}, {COLORS}.")
        side = SIZES[item.size] * image_size
        center_x, center_y = (coordinate * image_size for coordinate in POSITIONS[item.position])
        left, top = center_x - side / 2, center_y - side / 2
        right, bottom = left + side - 1, top + side - 1
        color = PALETTE[item.color]
        if item.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif item.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=color)
        else:
            draw.polygon(((center_x - 0.5, top), (right, bottom), (left, bottom)), fill=color)
    return image


def _random_scene_positions(rng: random.Random, count: int) -> list[str]:
    if count == 1:
        return [rng.choice(tuple(POSITIONS))]
    line = rng.choice(LINES)
    if count == 3:
        return list(line)
    return list(rng.choice(((line[0], line[2]), (line[0], line[1]), (line[1], line[2]))))


def _two_distinct_objects(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    first = (rng.choice(COLORS), rng.choice(SHAPES))
    while True:
        second = (rng.choice(COLORS), rng.choice(SHAPES))
        if second[0] != first[0]:
            return first, second


def sample_prompt(rng: random.Random, kind: str | None = None) -> Prompt:
    """Draw a caption of the given kind (one of `PROMPT_KINDS`, or a random kind)."""
    kind = kind or rng.choice(PROMPT_KINDS)
    color, shape = rng.choice(COLORS), rng.choice(SHAPES)
    if kind == "single":
        return Prompt(f"{_article(color)} {color} {shape}", kind, (Shape(color, shape, None, None),))
    if kind == "attributes":
        size = rng.choice(tuple(SIZES))
        return Prompt(f"a {size} {color} {shape}", kind, (Shape(color, shape, size, None),))
    if kind == "position":
        position = rng.choice(tuple(POSITIONS))
        if rng.random() < 0.5:
            size = rng.choice(tuple(SIZES))
            text = f"a {size} {color} {shape} {POSITION_PHRASES[position]}"
        else:
            size = None
            text = f"{_article(color)} {color} {shape} {POSITION_PHRASES[position]}"
        return Prompt(text, kind, (Shape(color, shape, size, position),))
    if kind == "relation":
        (color_a, shape_a), (color_b, shape_b) = _two_distinct_objects(rng)
        objects = (Shape(color_a, shape_a, None, None), Shape(color_b, shape_b, None, None))
        if rng.random() < 0.5:
            text = f"{_article(color_a)} {color_a} {shape_a} to the left of {_article(color_b)} {color_b} {shape_b}"
            return Prompt(text, kind, objects, ("left_of", 0, 1))
        text = f"{_article(color_a)} {color_a} {shape_a} above {_article(color_b)} {color_b} {shape_b}"
        return Prompt(text, kind, objects, ("above", 0, 1))
    if kind == "count":
        count = rng.choice((2, 3))
        objects = tuple(Shape(color, shape, None, None) for _ in range(count))
        return Prompt(f"{NUMBER_WORDS[count]} {color} {_plural(shape)}", kind, objects)
    raise ValueError(f"Unknown prompt kind {kind!r}; allowed: {PROMPT_KINDS}.")


def scene_for_prompt(prompt: Prompt, rng: random.Random) -> tuple[Shape, ...]:
    """Draw a scene that satisfies `prompt`, choosing what the caption leaves free."""
    objects = prompt.objects
    if len(objects) == 1:
        item = objects[0]
        size = item.size or rng.choice(tuple(SIZES))
        position = item.position or rng.choice(tuple(POSITIONS))
        return (replace(item, size=size, position=position),)

    positions = _random_scene_positions(rng, len(objects))
    if prompt.relation is not None:
        # Objects on a line are in reading order, so the first object goes first on the line the relation needs.
        line = LINES[0] if prompt.relation[0] == "left_of" else LINES[1]
        pair = rng.choice(((line[0], line[2]), (line[0], line[1]), (line[1], line[2])))
        positions = list(pair)
    size = rng.choice(tuple(SIZES))
    return tuple(replace(item, size=item.size or size, position=position) for item, position in zip(objects, positions))


def sample_caption_example(rng: random.Random, kind: str | None = None) -> tuple[Prompt, tuple[Shape, ...]]:
    """Draw a (prompt, scene) pair for text-to-image training or evaluation."""
    prompt = sample_prompt(rng, kind)
    return prompt, scene_for_prompt(prompt, rng)


def sample_scene(rng: random.Random) -> tuple[Shape, ...]:
    """Draw a scene of one to three objects with distinct (colour, shape) pairs, to be edited."""
    count = rng.choice((1, 1, 2, 2, 3))
    positions = _random_scene_positions(rng, count)
    size = rng.choice(tuple(SIZES))
    used: set[tuple[str, str]] = set()
    scene = []
    for position in positions:
        while True:
            color, shape = rng.choice(COLORS), rng.choice(SHAPES)
            if (color, shape) not in used:
                break
        used.add((color, shape))
        scene.append(Shape(color, shape, size, position))
    return tuple(scene)


def _free_positions(scene: tuple[Shape, ...]) -> list[str]:
    """Positions where one more object fits on the scene's line without overlapping another."""
    taken = [item.position for item in scene]
    if not taken:
        return list(POSITIONS)
    if taken == ["centre"]:
        return ["left", "right", "top", "bottom"]
    free = []
    for line in LINES:
        if all(position in line for position in taken):
            free += [position for position in line if position not in taken]
    return sorted(set(free), key=list(POSITIONS).index)


def _name(item: Shape, scene: tuple[Shape, ...], rng: random.Random) -> str:
    """Name an object of a scene: "the circle" when it is the only circle (half of the time), else "the red circle"."""
    unique_shape = sum(other.shape == item.shape for other in scene) == 1
    if unique_shape and rng.random() < 0.5:
        return f"the {item.shape}"
    return f"the {item.color} {item.shape}"


def sample_edit(rng: random.Random, kind: str | None = None) -> EditExample:
    """Draw an edit triplet of the given kind (one of `EDIT_KINDS`, or a random kind)."""
    kind = kind or rng.choice(EDIT_KINDS)
    if kind not in EDIT_KINDS:
        raise ValueError(f"Unknown edit kind {kind!r}; allowed: {EDIT_KINDS}.")
    while True:
        source = sample_scene(rng)
        free = _free_positions(source)
        if kind == "remove" and len(source) < 2:
            continue
        if kind in ("add", "move") and not free:
            continue
        break

    index = rng.randrange(len(source))
    item = source[index]
    others = tuple(other for position, other in enumerate(source) if position != index)
    if kind == "recolor":
        taken = {(other.color, other.shape) for other in source}
        new_color = rng.choice([color for color in COLORS if (color, item.shape) not in taken])
        target = source[:index] + (replace(item, color=new_color),) + source[index + 1 :]
        instruction = f"make {_name(item, source, rng)} {new_color}"
        return EditExample(source, instruction, target, kind, edited=index, removed=index, unchanged=others)
    if kind == "remove":
        instruction = f"remove {_name(item, source, rng)}"
        return EditExample(source, instruction, others, kind, edited=None, removed=index, unchanged=others)
    if kind == "move":
        position = rng.choice(free)
        target = source[:index] + (replace(item, position=position),) + source[index + 1 :]
        instruction = f"move {_name(item, source, rng)} to the {position}"
        return EditExample(source, instruction, target, kind, edited=index, removed=index, unchanged=others)

    taken = {(other.color, other.shape) for other in source}
    while True:
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        if (color, shape) not in taken:
            break
    position = rng.choice(free)
    added = Shape(color, shape, source[0].size, position)
    instruction = f"add {_article(color)} {color} {shape} {POSITION_PHRASES[position]}"
    return EditExample(source, instruction, source + (added,), kind, edited=len(source), removed=None, unchanged=source)


def to_array(image: PIL.Image.Image) -> np.ndarray:
    """Return an RGB image as a (height, width, 3) uint8 array."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
