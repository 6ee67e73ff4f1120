"""The toy world's vocabulary: shapes, colours, the held-out colour-shape pairs, question types
and their choices, generator defaults, and how objects are named.
(fusion/data/toy/__init__.py describes the world.)"""

from __future__ import annotations

import random
from dataclasses import dataclass

# ---------------------------------------------------------------- the world

SHAPES = ("circle", "square", "triangle")
COLORS = {  # RGB, far apart in hue and in brightness
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 30),
    "purple": (160, 60, 210),
    "orange": (250, 140, 20),
}
COLOR_NAMES = tuple(COLORS)
# Colours that only distractor objects wear (`--extra-colors`): never in a question or an answer,
# far from the palette, the background and each other.
EXTRA_COLORS = {
    "white": (235, 235, 235),
    "pink": (250, 150, 190),
    "cyan": (40, 210, 210),
    "brown": (140, 90, 40),
}
RGB = {**COLORS, **EXTRA_COLORS}
BACKGROUND = (40, 40, 40)
PAIRS = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)  # 18 colour-shape pairs
N_HELD_OUT = 3
SQUARE_HALF = 0.75  # a square's half-side / size: corners at 1.06 * size
CLEARANCE = 1.1  # bounding radius / size, for every shape (covers the corners)
SIZE_RANGE = (0.11, 0.17)  # size (radius) / image size: 3.5-5.4 px at 32 px
CAPTION_BAND = 0.125  # |x - S/2| below this * S is "middle" in captions
POSITION_MARGIN = 0.15  # a `position` object's centre is at least this * S off the midline
MIN_TRAVEL = 0.35  # a moving object travels at least this * S
FPS = 8
CRF = 12  # H.264 quality: near-lossless on flat colours
GOP = 4  # keyframe interval (frames)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 512

QUESTIONS = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count": "How many objects are there?",
    "position": "Is the {color} {shape} on the left or the right?",
    "exists": "Is there a {color} {shape}?",
    "direction": "Which way does the {color} {shape} move?",
}
CHOICES = {
    "color": list(COLOR_NAMES),
    "shape": list(SHAPES),
    "count": ["1", "2", "3", "4"],
    "position": ["left", "right"],
    "exists": ["yes", "no"],
    "direction": ["left", "right", "up", "down"],
}
IMAGE_TYPES = ("color", "shape", "count", "position", "exists")
VIDEO_TYPES = ("direction",)
VIDEO_EVENTS = ("move", "appear", "change")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # y grows down
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

DEFAULTS = {  # about 20 s on 2 cores at 32 px (see generate_toy)
    "n_text": 4000,
    "n_image": 4000,
    "n_video": 600,
    "n_vqa_train": 6000,
    "n_vqa_test": 600,
    "n_vqa_compositional": None,  # None: as many as n_vqa_test
    "n_video_vqa_train": 1500,
    "n_video_vqa_test": 300,
    "samples_per_shard": 500,
    "vqa_turns": 1,  # questions per vqa_image_train record (see vqa_image_sample)
    "extra_colors": (),  # EXTRA_COLORS for distractors in training scenes
}


@dataclass(frozen=True)
class World:
    """Everything a sample depends on besides its split and index (picklable, for workers)."""

    seed: int
    size: int  # image and frame side, pixels
    held_out: tuple[tuple[str, str], ...]  # (color, shape) pairs kept out of training
    n_frames: tuple[int, int]  # video length range, inclusive
    vqa_turns: int = 1  # questions per vqa_image_train record
    extra_colors: tuple[str, ...] = ()  # EXTRA_COLORS worn by distractors in training data

    @property
    def seen(self) -> tuple[tuple[str, str], ...]:
        return tuple(p for p in PAIRS if p not in self.held_out)

    @property
    def scenery(self) -> tuple[tuple[str, str], ...]:
        """What training scenes are made of: the seen pairs, and every shape in each extra colour."""
        return self.seen + tuple((c, sh) for c in self.extra_colors for sh in SHAPES)


def choose_held_out(seed: int) -> tuple[tuple[str, str], ...]:
    """N_HELD_OUT pairs with distinct colours and distinct shapes: every colour and every shape
    still occurs in training with other partners. Sorted, so the manifest reads the same."""
    rng = random.Random(f"{seed}-held-out")
    colors = rng.sample(COLOR_NAMES, N_HELD_OUT)
    shapes = rng.sample(SHAPES, N_HELD_OUT)
    return tuple(sorted(zip(colors, shapes), key=PAIRS.index))


def article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def named(obj: dict, definite: bool = False) -> str:
    """'a red circle', 'an orange square', 'the blue triangle'."""
    det = "the" if definite else article(obj["color"])
    return f"{det} {obj['color']} {obj['shape']}"
