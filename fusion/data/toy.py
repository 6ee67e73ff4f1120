"""`fusion-data toy`: an offline toy world of coloured shapes, as ready-made shards.

    fusion-data toy --output data/toy --seed 0
    fusion-data toy --output /tmp/toy --image-size 64 --n-video 100 --samples-per-shard 200

The world: filled circles, squares and triangles in six fixed colours on a dark grey background,
1-4 objects per scene, never overlapping (so counts are unambiguous). Everything is procedural;
nothing is downloaded. Under `--output DIR`:

    DIR/text/                     modality text:  captions, event sentences, facts, and
                                  "DESCRIPTION Q: QUESTION A: ANSWER" lines with the VQA templates
    DIR/image/                    modality image: KEY.png (lossless) + KEY.txt + KEY.json
    DIR/video/                    modality video: KEY.mp4 (H.264) + KEY.txt + KEY.json
    DIR/vqa_image_train/          modality vqa:   KEY.png + KEY.json {question, answer, choices, type}
                                  [+ turns: the same picture's conversation, with --vqa-turns N > 1]
    DIR/vqa_image_test/           same questions, seen colour-shape pairs only
    DIR/vqa_image_compositional/  questions about colour-shape pairs held out of every training split
    DIR/vqa_video_train/          KEY.mp4 + KEY.json, type `direction`
    DIR/vqa_video_test/
    DIR/toy.json                  manifest: seed, settings, held-out pairs, counts per split and type

Each dataset directory is a SPEC §4 shard directory (NNNNNN.tar, NNNNNN_stats.json, index.json).

Question templates and choices are fixed (QUESTIONS, CHOICES) so sets made elsewhere score the same
way. Every question has exactly one right answer, derivable from the `scene` stored in its json:
a `color` question's shape occurs once in the scene, a `shape` question's colour once; a `position`
object lies wholly on one side of the vertical midline; an `exists` "no" pair is absent; a
`direction` mover is the only object of its colour and shape. Answers are balanced per type (type
and answer cycle with the sample index), so a question-only model stays near chance.

Conversations (`--vqa-turns N`): a vqa_image_train record asks up to N questions about its picture,
stored as `turns` in its json (fusion-data vqa's conversation format): the balanced question first
(also at the json's top level), then one question of each other type that has exactly one right
answer in the scene, in random order, none about a colour-shape pair an earlier turn already
spelled out (so no answer can be read off the conversation). Test sets keep one question per record.

Extra colours (`--extra-colors white,pink,...`): distractor objects in the training splits' scenes
(text, image, vqa_image_train) may also wear EXTRA_COLORS, and captions name them; no question or
answer does, and test scenes never show them. Every shape is then seen in more colours.

Compositional generalisation: three colour-shape pairs (distinct colours, distinct shapes, chosen
from the seed) never occur in text, image, video or any VQA train/test split, in captions or scenes;
`vqa_image_compositional` asks about exactly those pairs.

Determinism: sample i of split S depends only on `random.Random(f"{seed}-{S}-{i}")` and the settings,
never on generation order or worker count; PNG (zlib) and H.264 (x264, one thread) encoding are
deterministic, and ShardWriter writes byte-identical tars, so the same seed and flags give
byte-identical shards.

Scene metadata (`scene` in the json): a list of {shape, color, x, y, size} with x, y the centre in
pixels (origin top-left, y down, pixel centres at i + 0.5) and `size` the radius: a circle has radius
`size`, a triangle (pointing up) is inscribed in the circle of radius `size`, a square has half-side
SQUARE_HALF * size. Videos add an `event`: {kind: move, index, direction, x1, y1} (the object moves
linearly from (x, y) at frame 0 to (x1, y1) at the last frame), {kind: appear, index, frame} (the
object is absent before `frame`), or {kind: change, index, color, frame} (it has the new colour from
`frame` on).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import io
import json
import math
import multiprocessing
import numbers
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fusion.cli import CliError, default_workers, int_at_least
from fusion.data.shards import foreign_shards, shard_name, shard_origin, write_index
from fusion.data.tar import ShardWriter
from fusion.data.tokenizer_train import (
    UNKNOWN_WORD,
    WORD_PATTERN,
    save_tokenizer,
    word_level_tokenizer,
)
from fusion.data.video import (
    DECORD_BAD_WIDTHS,
    VideoDecodeError,
    backend_available,
    decode,
    encode_frames,
    probe,
)

# ---------------------------------------------------------------- the world

SHAPES = ("circle", "square", "triangle")
COLORS = {                                  # RGB, far apart in hue and in brightness
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
PAIRS = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)   # 18 colour-shape pairs
N_HELD_OUT = 3
SQUARE_HALF = 0.75               # a square's half-side / size: corners at 1.06 * size
CLEARANCE = 1.1                  # bounding radius / size, for every shape (covers the corners)
SIZE_RANGE = (0.11, 0.17)        # size (radius) / image size: 3.5-5.4 px at 32 px
CAPTION_BAND = 0.125             # |x - S/2| below this * S is "middle" in captions
POSITION_MARGIN = 0.15           # a `position` object's centre is at least this * S off the midline
MIN_TRAVEL = 0.35                # a moving object travels at least this * S
FPS = 8
CRF = 12                         # H.264 quality: near-lossless on flat colours
GOP = 4                          # keyframe interval (frames)
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
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}   # y grows down
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

DEFAULTS = {                     # about 20 s on 2 cores at 32 px (see generate_toy)
    "n_text": 4000,
    "n_image": 4000,
    "n_video": 600,
    "n_vqa_train": 6000,
    "n_vqa_test": 600,
    "n_vqa_compositional": None,     # None: as many as n_vqa_test
    "n_video_vqa_train": 1500,
    "n_video_vqa_test": 300,
    "samples_per_shard": 500,
    "vqa_turns": 1,              # questions per vqa_image_train record (see vqa_image_sample)
    "extra_colors": (),          # EXTRA_COLORS for distractors in training scenes
}


@dataclass(frozen=True)
class World:
    """Everything a sample depends on besides its split and index (picklable, for workers)."""

    seed: int
    size: int                                 # image and frame side, pixels
    held_out: tuple[tuple[str, str], ...]     # (color, shape) pairs kept out of training
    n_frames: tuple[int, int]                 # video length range, inclusive
    vqa_turns: int = 1                        # questions per vqa_image_train record
    extra_colors: tuple[str, ...] = ()        # EXTRA_COLORS worn by distractors in training data

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


# ---------------------------------------------------------------- scenes

class PlacementError(RuntimeError):
    """No non-overlapping placement found (too many or too large objects for the image)."""


def _bounds(size: float, s: int) -> tuple[float, float]:
    pad = CLEARANCE * size + 0.5
    return pad, s - pad


def _clear(a: dict, b: dict, gap: float = 1.0) -> bool:
    """Bounding circles of a and b are at least `gap` pixels apart."""
    return math.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= CLEARANCE * (a["size"] + b["size"]) + gap


def _clear_of_path(obj: dict, path: tuple[dict, float, float], gap: float = 1.0) -> bool:
    """obj stays clear of a mover sweeping from (mover x, y) to (x1, y1)."""
    mover, x1, y1 = path
    px, py, dx, dy = mover["x"], mover["y"], x1 - mover["x"], y1 - mover["y"]
    t = min(1.0, max(0.0, ((obj["x"] - px) * dx + (obj["y"] - py) * dy) / max(dx * dx + dy * dy, 1e-9)))
    d = math.hypot(obj["x"] - (px + t * dx), obj["y"] - (py + t * dy))
    return d >= CLEARANCE * (obj["size"] + mover["size"]) + gap


def side_of(x: float, s: int) -> str:
    """'left' / 'right' of the vertical midline (a `position` answer)."""
    return "left" if x < s / 2 else "right"


def place_scene(rng: random.Random, s: int, pairs: Sequence[tuple[str, str]], *,
                first_side: str | None = None,
                path: tuple[dict, float, float] | None = None,
                fixed: Sequence[dict] = ()) -> list[dict]:
    """Objects for `pairs` (colour, shape) at random non-overlapping positions and sizes.

    `first_side`: the first object lies wholly on that side, its centre POSITION_MARGIN * s off
    the midline. `path`: a mover (in `fixed`) sweeping to (x1, y1) that new objects must avoid.
    `fixed`: objects already placed. Returns fixed + new, in that order.
    """
    lo_size, hi_size = SIZE_RANGE[0] * s, SIZE_RANGE[1] * s
    for _ in range(200):
        placed = list(fixed)
        for k, (color, shape) in enumerate(pairs):
            for _ in range(100):
                size = round(rng.uniform(lo_size, hi_size), 2)
                lo, hi = _bounds(size, s)
                if k == 0 and first_side is not None:
                    off = max(POSITION_MARGIN * s, CLEARANCE * size + 1.0)
                    lo_x, hi_x = (lo, s / 2 - off) if first_side == "left" else (s / 2 + off, hi)
                    if lo_x > hi_x:
                        continue
                    x = rng.uniform(lo_x, hi_x)
                else:
                    x = rng.uniform(lo, hi)
                obj = {"shape": shape, "color": color, "x": round(x, 2),
                       "y": round(rng.uniform(lo, hi), 2), "size": size}
                if all(_clear(obj, other) for other in placed) and \
                        (path is None or _clear_of_path(obj, path)):
                    placed.append(obj)
                    break
            else:
                break                           # this object found no room: start over
        else:
            return placed
    raise PlacementError(f"cannot place {len(pairs)} objects in a {s}x{s} image")


# ---------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=8)
def _pixel_centres(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5      # (S, S) each
    return yy, xx


def shape_mask(obj: dict, s: int, x: float | None = None, y: float | None = None) -> np.ndarray:
    """(S, S) bool: the pixels whose centres lie inside `obj` (optionally moved to x, y)."""
    yy, xx = _pixel_centres(s)
    dx = xx - (obj["x"] if x is None else x)
    dy = yy - (obj["y"] if y is None else y)
    r = obj["size"]
    if obj["shape"] == "circle":
        return dx * dx + dy * dy <= r * r
    if obj["shape"] == "square":
        h = SQUARE_HALF * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj["shape"] == "triangle":          # apex up at (0, -r), base corners (+-r*sqrt3/2, r/2)
        return (dy <= r / 2) & (dy >= -r + np.sqrt(3) * np.abs(dx))
    raise ValueError(f"unknown shape {obj['shape']!r}")


def render_image(scene: Sequence[dict], s: int) -> np.ndarray:
    """The scene as uint8 (S, S, 3) RGB, no anti-aliasing: every object pixel has its exact colour."""
    img = np.empty((s, s, 3), np.uint8)
    img[:] = BACKGROUND
    for obj in scene:
        img[shape_mask(obj, s)] = RGB[obj["color"]]
    return img


def object_at(obj: dict, event: dict | None, index: int, t: int, n_frames: int) -> dict | None:
    """Object `index` as it looks in frame t (None while not yet there)."""
    if event is None or event["index"] != index:
        return obj
    if event["kind"] == "move":
        a = t / (n_frames - 1)
        return {**obj, "x": obj["x"] + a * (event["x1"] - obj["x"]),
                "y": obj["y"] + a * (event["y1"] - obj["y"])}
    if event["kind"] == "appear":
        return obj if t >= event["frame"] else None
    if event["kind"] == "change":
        return {**obj, "color": event["color"]} if t >= event["frame"] else obj
    raise ValueError(f"unknown event {event['kind']!r}")


def render_video(scene: Sequence[dict], event: dict | None, n_frames: int, s: int) -> np.ndarray:
    """uint8 (F, S, S, 3) frames of the scene with its event."""
    frames = []
    for t in range(n_frames):
        now = [object_at(o, event, k, t, n_frames) for k, o in enumerate(scene)]
        frames.append(render_image([o for o in now if o is not None], s))
    return np.stack(frames)                                        # (F, S, S, 3)


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = FPS) -> bytes:
    """H.264 yuv420p mp4 of uint8 (F, H, W, 3) frames: one thread, no B-frames, short GOP, so the
    bytes depend only on the frames (and the x264 build)."""
    return encode_frames(frames, fps, crf=CRF, keyframe_interval=GOP, preset="medium",
                         scene_cuts=True)


def video_meta(data: bytes) -> dict:
    """{fps, n_frames (decoded), duration, width, height} of an encoded clip, read back by PyAV."""
    meta = probe(data, backend="pyav")
    return {"fps": meta.fps, "n_frames": meta.n_frames, "duration": round(meta.duration, 6),
            "width": meta.width, "height": meta.height}


# ---------------------------------------------------------------- language

def where(obj: dict, s: int) -> str:
    """Caption phrase for an object's place on a 3x3 grid: 'on the left', 'at the top right'."""
    band = CAPTION_BAND * s
    h = "left" if obj["x"] < s / 2 - band else "right" if obj["x"] > s / 2 + band else ""
    v = "top" if obj["y"] < s / 2 - band else "bottom" if obj["y"] > s / 2 + band else ""
    if v and h:
        return f"at the {v} {h}"
    if v:
        return f"at the {v}"
    return f"on the {h}" if h else "in the middle"


def join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe_scene(rng: random.Random, scene: Sequence[dict], s: int) -> str:
    """A caption listing every object left to right: 'a red circle on the left and ...'."""
    parts = join([f"{named(o)} {where(o, s)}" for o in sorted(scene, key=lambda o: o["x"])])
    n = len(scene)
    return rng.choice([
        f"{parts}.",
        f"{COUNT_WORDS[n]} {'object' if n == 1 else 'objects'}: {parts}.",
        f"a picture of {parts}.",
    ])


def describe_event(rng: random.Random, scene: Sequence[dict], event: dict, s: int) -> str:
    """'a red circle moves to the left. a blue square on the right stays still.'"""
    obj = scene[event["index"]]
    if event["kind"] == "move":
        d = event["direction"]
        phrase = f"to the {d}" if d in ("left", "right") else d
        first = rng.choice([f"{named(obj)} moves {phrase}.", f"{named(obj, True)} moves {phrase}.",
                            f"{named(obj)} {where(obj, s)} moves {phrase}."])
    elif event["kind"] == "appear":
        first = rng.choice([f"{named(obj)} appears {where(obj, s)}.",
                            f"suddenly {named(obj)} appears {where(obj, s)}."])
    else:
        first = rng.choice([f"{named(obj, True)} turns {event['color']}.",
                            f"{named(obj)} {where(obj, s)} changes color to {event['color']}."])
    others = [o for k, o in enumerate(scene) if k != event["index"]]
    if not others:
        return first
    listed = join([f"{named(o)} {where(o, s)}" for o in sorted(others, key=lambda o: o["x"])])
    return f"{first} {listed} {'stays' if len(others) == 1 else 'stay'} still."


def qa_text(question: str, answer: str) -> str:
    return f"Q: {question} A: {answer}"


FACTS = (
    "a circle is round.",
    "a square has four equal sides and four corners.",
    "a triangle has three sides and three corners.",
    "the shapes are circles, squares and triangles.",
    "the colors are red, green, blue, yellow, purple and orange.",
    "an object is on the left or on the right.",
    "objects can move left, right, up or down.",
    "one, two, three, four. 1, 2, 3, 4.",
    "a scene has one, two, three or four objects.",
    "the answer to a yes or no question is yes or no.",
)


# ---------------------------------------------------------------- questions

def _pick(rng: random.Random, pool: Sequence[tuple[str, str]], *, not_color: str | None = None,
          not_shape: str | None = None, not_pair: tuple[str, str] | None = None) -> tuple[str, str]:
    options = [p for p in pool if p[0] != not_color and p[1] != not_shape and p != not_pair]
    return rng.choice(options)


def make_image_question(rng: random.Random, world: World, qtype: str, answer: str,
                        compositional: bool = False, training: bool = False) -> tuple[list[dict], str]:
    """A scene whose one right answer to a `qtype` question is `answer`; returns (scene, question).

    Seen pairs only, unless `compositional`: then the question's referent is a held-out pair (for
    `count`, at least one object is) and the other objects may be any pair. With `training`, the
    other objects may also wear the world's extra colours.
    """
    s, seen = world.size, world.seen
    pool = PAIRS if compositional else seen
    near_pool = pool
    if training:
        pool = world.scenery
    n = int(answer) if qtype == "count" else rng.randint(1, 4)
    side = None
    if qtype == "color":
        if compositional:
            color, shape = next(p for p in world.held_out if p[0] == answer)
        else:
            color, shape = answer, rng.choice([sh for c, sh in seen if c == answer])
        pairs = [(color, shape)] + [_pick(rng, pool, not_shape=shape) for _ in range(n - 1)]
        question = QUESTIONS["color"].format(shape=shape)
    elif qtype == "shape":
        if compositional:
            color, shape = next(p for p in world.held_out if p[1] == answer)
        else:
            color, shape = rng.choice([c for c, sh in seen if sh == answer]), answer
        pairs = [(color, shape)] + [_pick(rng, pool, not_color=color) for _ in range(n - 1)]
        question = QUESTIONS["shape"].format(color=color)
    elif qtype == "count":
        first = rng.choice(world.held_out) if compositional else rng.choice(seen)
        pairs = [first] + [rng.choice(pool) for _ in range(n - 1)]
        question = QUESTIONS["count"]
    elif qtype == "position":
        color, shape = rng.choice(world.held_out if compositional else seen)
        pairs = [(color, shape)] + [_pick(rng, pool, not_pair=(color, shape)) for _ in range(n - 1)]
        side = answer
        question = QUESTIONS["position"].format(color=color, shape=shape)
    elif qtype == "exists":
        color, shape = rng.choice(world.held_out if compositional else seen)
        others = [_pick(rng, pool, not_pair=(color, shape)) for _ in range(n - 1)]
        if answer == "yes":
            pairs = [(color, shape)] + others
        else:                           # hard negatives: the colour or the shape is there, alone
            near = [p for p in near_pool if (p[0] == color) != (p[1] == shape)]
            pairs = [rng.choice(near)] + others
        question = QUESTIONS["exists"].format(color=color, shape=shape)
    else:
        raise ValueError(f"not an image question type: {qtype!r}")
    return place_scene(rng, s, pairs, first_side=side), question


def _wholly_on_one_side(obj: dict, s: int) -> bool:
    """obj is as far off the midline as a `position` question's object is placed."""
    return abs(obj["x"] - s / 2) >= max(POSITION_MARGIN * s, CLEARANCE * obj["size"] + 1.0)


def scene_question(rng: random.Random, world: World, scene: Sequence[dict], qtype: str,
                   named: set[tuple[str, str]] = frozenset()
                   ) -> tuple[str, str, tuple[str, str] | None] | None:
    """A `qtype` question about an existing scene with exactly one right answer there:
    (question, answer, the colour-shape pair it names with its answer, or None for `count`).
    None when the scene allows none: no shape or colour that occurs once, no object far enough
    off the midline, or every candidate is a pair in `named` (pairs an earlier turn of the same
    conversation already spelled out, so its answer could be read off the text). Questions name
    seen pairs only."""
    s = world.size
    pairs = [(o["color"], o["shape"]) for o in scene]
    single = [p for p in pairs if pairs.count(p) == 1 and p not in named and p[0] in COLORS]
    if qtype == "count":
        return QUESTIONS["count"], str(len(scene)), None
    if qtype == "color":
        options = [p for p in single if sum(q[1] == p[1] for q in pairs) == 1]
        if not options:
            return None
        pair = rng.choice(options)
        return QUESTIONS["color"].format(shape=pair[1]), pair[0], pair
    if qtype == "shape":
        options = [p for p in single if sum(q[0] == p[0] for q in pairs) == 1]
        if not options:
            return None
        pair = rng.choice(options)
        return QUESTIONS["shape"].format(color=pair[0]), pair[1], pair
    if qtype == "position":
        objs = [o for o in scene if (o["color"], o["shape"]) in single and _wholly_on_one_side(o, s)]
        if not objs:
            return None
        o = rng.choice(objs)
        return (QUESTIONS["position"].format(color=o["color"], shape=o["shape"]),
                side_of(o["x"], s), (o["color"], o["shape"]))
    if qtype == "exists":
        absent = [p for p in world.seen if p not in pairs and p not in named]
        near = [p for p in absent if any(p[0] == c or p[1] == sh for c, sh in pairs)]
        if not (single and absent):     # only when either answer could be asked: yes / no even
            return None
        if rng.random() < 0.5:
            pair, answer = rng.choice(single), "yes"
        else:
            pair, answer = rng.choice(near or absent), "no"
        return QUESTIONS["exists"].format(color=pair[0], shape=pair[1]), answer, pair
    raise ValueError(f"not an image question type: {qtype!r}")


def question_pair(qtype: str, question: str, answer: str) -> tuple[str, str] | None:
    """The colour-shape pair a question spells out together with its answer (None: count)."""
    words = _WORD.findall(question)
    color = next((w for w in words if w in COLORS), answer if qtype == "color" else None)
    shape = next((w for w in words if w in SHAPES), answer if qtype == "shape" else None)
    return (color, shape) if color and shape else None


def make_motion(rng: random.Random, world: World, pair: tuple[str, str], direction: str,
                n_others: int, pool: Sequence[tuple[str, str]]) -> tuple[list[dict], dict]:
    """A mover of `pair` travelling `direction` by at least MIN_TRAVEL * S, plus `n_others` still
    objects clear of its path (none of them the mover's pair). Returns (scene, event)."""
    s = world.size
    dx, dy = DIRECTIONS[direction]
    for _ in range(200):
        size = round(rng.uniform(SIZE_RANGE[0] * s, SIZE_RANGE[1] * s), 2)
        lo, hi = _bounds(size, s)
        travel = rng.uniform(MIN_TRAVEL * s, hi - lo)
        start = [rng.uniform(lo, hi), rng.uniform(lo, hi)]
        for axis, d in ((0, dx), (1, dy)):   # the moving axis: start where the travel fits
            if d:
                start[axis] = rng.uniform(lo, hi - travel) if d > 0 else rng.uniform(lo + travel, hi)
        mover = {"shape": pair[1], "color": pair[0], "x": round(start[0], 2),
                 "y": round(start[1], 2), "size": size}
        x1, y1 = round(mover["x"] + dx * travel, 2), round(mover["y"] + dy * travel, 2)
        others = [_pick(rng, pool, not_pair=pair) for _ in range(n_others)]
        try:
            scene = place_scene(rng, s, others, path=(mover, x1, y1), fixed=[mover])
        except PlacementError:
            n_others = max(0, n_others - 1)
            continue
        return scene, {"kind": "move", "index": 0, "direction": direction, "x1": x1, "y1": y1}
    raise PlacementError(f"cannot place a moving object in a {s}x{s} frame")


def make_event(rng: random.Random, world: World, kind: str, n_frames: int
               ) -> tuple[list[dict], dict]:
    """A caption video's scene and event of `kind` in a clip of `n_frames`, seen pairs only
    (before and after a change)."""
    seen = world.seen
    n_others = rng.randint(0, 2)
    if kind == "move":
        return make_motion(rng, world, rng.choice(seen), rng.choice(tuple(DIRECTIONS)), n_others, seen)
    pair = rng.choice(seen)
    scene = place_scene(rng, world.size, [pair] + [_pick(rng, seen, not_pair=pair)
                                                  for _ in range(n_others)])
    frame = rng.randint(max(1, n_frames // 4), max(1, (3 * n_frames) // 4))   # never the first
    if kind == "appear":
        return scene, {"kind": "appear", "index": 0, "frame": frame}
    color = rng.choice([c for c, sh in seen if sh == pair[1] and c != pair[0]])
    return scene, {"kind": "change", "index": 0, "color": color, "frame": frame}


# ---------------------------------------------------------------- samples

def _rng(world: World, split: str, i: int) -> random.Random:
    return random.Random(f"{world.seed}-{split}-{i}")


def cycle(i: int, types: Sequence[str]) -> tuple[str, str]:
    """(type, answer) of sample i: types cycle fastest, each type's answers cycle in turn."""
    qtype = types[i % len(types)]
    choices = CHOICES[qtype]
    return qtype, choices[(i // len(types)) % len(choices)]


def compositional_answers(world: World, qtype: str) -> list[str]:
    """The answers a compositional question of `qtype` can have (the held-out colours/shapes)."""
    if qtype == "color":
        return [c for c, _ in world.held_out]
    if qtype == "shape":
        return [s for _, s in world.held_out]
    return CHOICES[qtype]


def text_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    s = world.size
    kind = rng.choices(("caption", "qa", "event", "fact"), weights=(30, 45, 15, 10))[0]
    meta: dict = {"source": "toy", "kind": kind}
    if kind == "caption":
        n = rng.randint(1, 4)
        scene = place_scene(rng, s, [rng.choice(world.scenery) for _ in range(n)])
        text, meta["scene"] = describe_scene(rng, scene, s), scene
    elif kind == "qa":
        qtype = rng.choice(IMAGE_TYPES + VIDEO_TYPES)
        answer = rng.choice(CHOICES[qtype])
        if qtype == "direction":
            pair = rng.choice(world.seen)
            scene, event = make_motion(rng, world, pair, answer, rng.randint(0, 2), world.seen)
            context = describe_event(rng, scene, event, s)
            question = QUESTIONS["direction"].format(color=pair[0], shape=pair[1])
            meta["event"] = event
        else:
            scene, question = make_image_question(rng, world, qtype, answer, training=True)
            context = describe_scene(rng, scene, s)
        text = f"{context} {qa_text(question, answer)}"
        meta.update({"scene": scene, "type": qtype, "question": question, "answer": answer})
    elif kind == "event":
        scene, event = make_event(rng, world, rng.choice(VIDEO_EVENTS), rng.randint(*world.n_frames))
        text = describe_event(rng, scene, event, s)
        meta.update({"scene": scene, "event": event})
    else:
        text = rng.choice(FACTS)
    return {"txt": text, "json": meta}


def image_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    n = rng.randint(1, 4)
    scene = place_scene(rng, world.size, [rng.choice(world.scenery) for _ in range(n)])
    return {"png": encode_png(render_image(scene, world.size)),
            "txt": describe_scene(rng, scene, world.size),
            "json": {"width": world.size, "height": world.size, "source": "toy", "scene": scene}}


def _clip(world: World, scene: list[dict], event: dict, n_frames: int) -> tuple[bytes, dict]:
    data = encode_mp4(render_video(scene, event, n_frames, world.size))
    meta = video_meta(data)
    if meta["n_frames"] != n_frames:
        raise RuntimeError(f"encoded {n_frames} frames, decoded {meta['n_frames']}")
    return data, meta


def video_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    n_frames = rng.randint(*world.n_frames)
    scene, event = make_event(rng, world, VIDEO_EVENTS[i % len(VIDEO_EVENTS)], n_frames)
    caption = describe_event(rng, scene, event, world.size)
    data, meta = _clip(world, scene, event, n_frames)
    return {"mp4": data, "txt": caption,
            "json": {**meta, "source": "toy", "scene": scene, "event": event}}


def vqa_image_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    compositional = split.endswith("compositional")
    if compositional:
        qtype = IMAGE_TYPES[i % len(IMAGE_TYPES)]
        answers = compositional_answers(world, qtype)
        answer = answers[(i // len(IMAGE_TYPES)) % len(answers)]
    else:
        qtype, answer = cycle(i, IMAGE_TYPES)
    scene, question = make_image_question(rng, world, qtype, answer, compositional,
                                          training=split == "vqa_image_train")
    first = {"question": question, "answer": answer, "choices": CHOICES[qtype], "type": qtype}
    meta = dict(first)
    if split == "vqa_image_train" and world.vqa_turns > 1:
        # a conversation about the picture: the balanced first question, then up to
        # vqa_turns - 1 more, one per other type that has a right answer in this scene
        # whose answer the earlier turns do not already give away
        turns = [first]
        named = {question_pair(qtype, question, answer)} - {None}
        others = [t for t in IMAGE_TYPES if t != qtype]
        rng.shuffle(others)
        for other in others:
            if len(turns) == world.vqa_turns:
                break
            asked = scene_question(rng, world, scene, other, named)
            if asked is not None:
                turns.append({"question": asked[0], "answer": asked[1],
                              "choices": CHOICES[other], "type": other})
                named |= {asked[2]} - {None}
        meta["turns"] = turns
    return {"png": encode_png(render_image(scene, world.size)),
            "json": {**meta, "width": world.size, "height": world.size, "source": "toy",
                     "scene": scene}}


def vqa_video_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    qtype, answer = cycle(i, VIDEO_TYPES)
    n_frames = rng.randint(*world.n_frames)
    pair = rng.choice(world.seen)
    scene, event = make_motion(rng, world, pair, answer, rng.randint(0, 2), world.seen)
    data, meta = _clip(world, scene, event, n_frames)
    question = QUESTIONS["direction"].format(color=pair[0], shape=pair[1])
    return {"mp4": data,
            "json": {"question": question, "answer": answer, "choices": CHOICES[qtype],
                     "type": qtype, **meta, "source": "toy", "scene": scene, "event": event}}


# ---------------------------------------------------------------- splits

@dataclass(frozen=True)
class Split:
    name: str            # directory under --output
    modality: str        # SPEC §4 modality
    count_arg: str       # generate_toy argument giving its size
    make: Callable[[World, str, int], dict]
    types: tuple[str, ...] = ()


SPLITS = (
    Split("text", "text", "n_text", text_sample),
    Split("image", "image", "n_image", image_sample),
    Split("video", "video", "n_video", video_sample),
    Split("vqa_image_train", "vqa", "n_vqa_train", vqa_image_sample, IMAGE_TYPES),
    Split("vqa_image_test", "vqa", "n_vqa_test", vqa_image_sample, IMAGE_TYPES),
    Split("vqa_image_compositional", "vqa", "n_vqa_compositional", vqa_image_sample, IMAGE_TYPES),
    Split("vqa_video_train", "vqa", "n_video_vqa_train", vqa_video_sample, VIDEO_TYPES),
    Split("vqa_video_test", "vqa", "n_video_vqa_test", vqa_video_sample, VIDEO_TYPES),
)
SPLITS_BY_NAME = {sp.name: sp for sp in SPLITS}
VIDEO_SPLITS = ("video", "vqa_video_train", "vqa_video_test")


def sample_key(split: str, i: int) -> str:
    return f"{split}-{i:06d}"


def count_types(split: Split, n: int) -> dict[str, int]:
    """Samples per question type in the first n samples of a VQA split (types cycle with i)."""
    return {t: len(range(k, n, len(split.types))) for k, t in enumerate(split.types)}


STATS_SOURCE = "toy"   # in every toy shard's stats: what marks a shard as this generator's


def write_toy_shard(world: World, output: str, split_name: str, shard: int, start: int,
                    stop: int) -> set[str]:
    """Samples [start, stop) of a split into shard `shard` of DIR/split; returns the words of
    their text (captions, questions, answers, choices) for the toy tokenizer."""
    split = SPLITS_BY_NAME[split_name]
    words: set[str] = set()
    stats = {"source": STATS_SOURCE}
    with ShardWriter(Path(output) / split.name, shard, extra_stats=stats) as writer:
        for i in range(start, stop):
            sample = split.make(world, split.name, i)
            words.update(text_words(sample))
            writer.write(sample_key(split.name, i), sample)
    return words


# The toy tokenizer is `fusion-data tokenizer --kind word`'s (fusion/data/tokenizer_train.py):
# words are runs of word characters or of punctuation, so "triangle?" is two tokens.
_WORD = WORD_PATTERN
TOKENIZER_FILE = "tokenizer.json"


def text_words(sample: dict) -> set[str]:
    """Every word of a toy sample's text: the caption, and a VQA question, answer and choices."""
    meta = sample.get("json") or {}
    texts = [sample.get("txt", ""), meta.get("question", ""), meta.get("answer", ""),
             *meta.get("choices", ())]
    for turn in meta.get("turns", ()):
        texts += [turn["question"], turn["answer"], *turn["choices"]]
    return {w for text in texts for w in _WORD.findall(text)}


def write_toy_tokenizer(path: Path, words: set[str]) -> None:
    """A word-level Hugging Face tokenizer.json over the toy world's words: one token per word or
    punctuation run (a VQA answer is one token), anything else the unknown token, and fusion's
    special tokens stored in it so their ids are fixed. Same words, same bytes."""
    fixed = {w for t in QUESTIONS.values() for w in _WORD.findall(t.format(color="", shape=""))}
    fixed |= {w for choices in CHOICES.values() for w in choices} | set(COLOR_NAMES) | set(SHAPES)
    save_tokenizer(word_level_tokenizer(words | fixed | {str(d) for d in range(10)}), path)


_SHARD_FILE = re.compile(r"^(\d{6})(\.tar|_stats\.json)$")


def _remove_stale_shards(directory: Path, n_shards: int) -> None:
    """Drop shards (and their stats) numbered n_shards and up, left by a larger earlier run."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        m = _SHARD_FILE.match(path.name)
        if m and int(m.group(1)) >= n_shards:
            path.unlink()
    if n_shards == 0:
        (directory / "index.json").unlink(missing_ok=True)


def check_toy_output(output: Path) -> None:
    """ValueError, before anything is written, when `output` holds files a toy run would overwrite
    or delete that this generator did not write: shards in a split directory whose stats lack
    `source: toy` (a `fusion-data text` build, img2dataset, a plain tar), or a tokenizer.json
    that is not a toy word-level tokenizer. A toy world of any seed and size is fine."""
    for split in SPLITS:
        directory = output / split.name
        foreign = foreign_shards(directory, lambda stats: stats.get("source") == STATS_SOURCE)
        if foreign:
            names = ", ".join(n for n, _ in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(f"'{directory}' holds {len(foreign)} shard(s) the toy generator did "
                             f"not write ({names}: {shard_origin(foreign[0][1])}); give another "
                             f"--output, or move them away")
    tokenizer = output / TOKENIZER_FILE
    if tokenizer.exists():
        try:
            model = json.loads(tokenizer.read_text())["model"]
            ours = model["type"] == "WordLevel" and model["unk_token"] == UNKNOWN_WORD
        except (OSError, ValueError, LookupError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"'{tokenizer}' is not a toy tokenizer and would be overwritten; "
                             f"give another --output, or move it away")


# ---------------------------------------------------------------- checks

@functools.lru_cache(maxsize=None)
def check_image_size(size: int) -> int:
    """`size`, or ValueError saying why it cannot be the image and video frame size."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValueError(f"image size must be an integer, got {size!r}")
    size = int(size)
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size {size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} "
                         f"(below {MIN_IMAGE_SIZE} px the shapes are too small to tell apart)")
    if size % 2:
        raise ValueError(f"image size {size} is odd; H.264 yuv420p frames need an even size")
    if size in DECORD_BAD_WIDTHS or not _decord_reads(size):
        good = next(k for k in range(size + 2, MAX_IMAGE_SIZE + 1, 2)
                    if k not in DECORD_BAD_WIDTHS and _decord_reads(k))
        raise ValueError(f"image size {size}: decord 0.6.0 misdecodes videos {size} pixels wide; "
                         f"use e.g. {good} (32 and 64 work)")
    return size


@functools.lru_cache(maxsize=None)
def _decord_reads(size: int) -> bool:
    """True unless decord is installed and decodes a tiny clip of this width wrongly."""
    if not (backend_available("pyav") and backend_available("decord")):
        return True
    frames = np.zeros((2, size, size, 3), np.uint8)
    try:
        got = decode(encode_mp4(frames), [0, 1], backend="decord")
    except VideoDecodeError:
        return False
    return got.shape == frames.shape


def _check_counts(counts: dict[str, int], samples_per_shard: int, n_frames: tuple[int, int]) -> None:
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be an integer >= 1, got {samples_per_shard!r}")
    lo, hi = n_frames
    if not 2 <= lo <= hi:
        raise ValueError(f"n_frames must be (min, max) with 2 <= min <= max, got {n_frames!r}")
    if any(counts[SPLITS_BY_NAME[v].count_arg] for v in VIDEO_SPLITS) \
            and not backend_available("pyav"):
        raise ValueError("toy videos are encoded with PyAV, which is not installed "
                         "(pip install av), or ask for no videos: --n-video 0 "
                         "--n-video-vqa-train 0 --n-video-vqa-test 0")


# ---------------------------------------------------------------- the generator

def generate_toy(output: str | os.PathLike, seed: int = 0, image_size: int = 32,
                 n_text: int = DEFAULTS["n_text"], n_image: int = DEFAULTS["n_image"],
                 n_video: int = DEFAULTS["n_video"], n_vqa_train: int = DEFAULTS["n_vqa_train"],
                 n_vqa_test: int = DEFAULTS["n_vqa_test"],
                 n_video_vqa_train: int = DEFAULTS["n_video_vqa_train"],
                 n_video_vqa_test: int = DEFAULTS["n_video_vqa_test"],
                 n_frames: tuple[int, int] = (8, 16),
                 samples_per_shard: int = DEFAULTS["samples_per_shard"],
                 n_vqa_compositional: int | None = None, workers: int = 1,
                 vqa_turns: int = DEFAULTS["vqa_turns"],
                 extra_colors: Sequence[str] = DEFAULTS["extra_colors"]) -> dict:
    """Write the toy corpora and VQA sets under `output`; return the summary (also DIR/toy.json).

    The defaults take about 20 s on 2 cores at 32 px (workers=2). `n_vqa_compositional` defaults
    to `n_vqa_test`. `workers` > 1 writes shards in that many processes; the output is the same.
    Toy shards already there (any seed, size or counts) are overwritten, surplus ones from a larger
    run removed; anything else a run would overwrite or delete makes it raise ValueError first
    (`check_toy_output`).
    Summary: {seed, image_size, n_frames, fps, samples_per_shard, held_out_pairs,
    splits: {name: {dir, modality, n_samples, shards, by_type}}, seconds}.
    """
    t0 = time.perf_counter()
    check_image_size(image_size)
    counts = {"n_text": n_text, "n_image": n_image, "n_video": n_video,
              "n_vqa_train": n_vqa_train, "n_vqa_test": n_vqa_test,
              "n_vqa_compositional": n_vqa_test if n_vqa_compositional is None else n_vqa_compositional,
              "n_video_vqa_train": n_video_vqa_train, "n_video_vqa_test": n_video_vqa_test}
    n_frames = (int(n_frames[0]), int(n_frames[1]))
    _check_counts(counts, samples_per_shard, n_frames)
    output = Path(output)
    check_toy_output(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "toy.json").unlink(missing_ok=True)     # written last: it marks a complete set
    if isinstance(vqa_turns, bool) or not isinstance(vqa_turns, int) \
            or not 1 <= vqa_turns <= len(IMAGE_TYPES):
        raise ValueError(f"vqa_turns must be an integer 1..{len(IMAGE_TYPES)}, got {vqa_turns!r}")
    extra_colors = tuple(extra_colors)
    unknown = [c for c in extra_colors if c not in EXTRA_COLORS]
    if unknown or len(set(extra_colors)) != len(extra_colors):
        raise ValueError(f"extra colors must be distinct names from {', '.join(EXTRA_COLORS)}, "
                         f"got {', '.join(extra_colors)}")
    world = World(seed=seed, size=image_size, held_out=choose_held_out(seed), n_frames=n_frames,
                  vqa_turns=vqa_turns, extra_colors=extra_colors)

    tasks = []                                  # (split, shard, start, stop)
    for split in SPLITS:
        n = counts[split.count_arg]
        n_shards = -(-n // samples_per_shard)
        _remove_stale_shards(output / split.name, n_shards)
        tasks += [(split.name, k, k * samples_per_shard, min(n, (k + 1) * samples_per_shard))
                  for k in range(n_shards)]
    # Videos are the slow part: start them first so the workers finish together.
    tasks.sort(key=lambda t: t[0] not in VIDEO_SPLITS)
    words: set[str] = set()
    if workers > 1 and len(tasks) > 1:
        # spawn, not fork: the caller may hold threads (torch, a DataLoader) that fork would copy
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
            for future in [pool.submit(write_toy_shard, world, str(output), *t) for t in tasks]:
                words |= future.result()
    else:
        for t in tasks:
            words |= write_toy_shard(world, str(output), *t)
    write_toy_tokenizer(output / TOKENIZER_FILE, words)

    splits = {}
    for split in SPLITS:
        n = counts[split.count_arg]
        names = [shard_name(k) for k in range(-(-n // samples_per_shard))]
        if names:
            write_index(output / split.name, split.modality, names=names,
                        counts={name: min(samples_per_shard, n - k * samples_per_shard)
                                for k, name in enumerate(names)})
        splits[split.name] = {"dir": split.name, "modality": split.modality, "n_samples": n,
                              "shards": len(names), "by_type": count_types(split, n)}
    summary = {
        "seed": seed,
        "image_size": image_size,
        "n_frames": list(n_frames),
        "fps": FPS,
        "samples_per_shard": samples_per_shard,
        "counts": counts,
        "vqa_turns": vqa_turns,
        "extra_colors": {c: list(EXTRA_COLORS[c]) for c in extra_colors},
        "held_out_pairs": [list(p) for p in world.held_out],
        "colors": {c: list(rgb) for c, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "background": list(BACKGROUND),
        "questions": QUESTIONS,
        "choices": CHOICES,
        "splits": splits,
        "tokenizer": TOKENIZER_FILE,
    }
    # The manifest is written last and holds no timing: same flags, same bytes.
    tmp = output / "toy.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, output / "toy.json")
    return {**summary, "output": str(output), "seconds": round(time.perf_counter() - t0, 2)}


def format_summary(summary: dict) -> str:
    """The printed summary: one line per split with its counts per question type."""
    held = ", ".join(f"{c} {s}" for c, s in summary["held_out_pairs"])
    lines = [f"toy world in {summary['output']}: seed {summary['seed']}, "
             f"{summary['image_size']}x{summary['image_size']} px, held-out pairs: {held} "
             f"({summary['seconds']:.1f} s)"]
    for name, sp in summary["splits"].items():
        types = ", ".join(f"{t} {n}" for t, n in sp["by_type"].items())
        lines.append(f"  {name:<25} {sp['modality']:<5} {sp['n_samples']:>6} samples "
                     f"{sp['shards']:>3} shards" + (f"   {types}" if types else ""))
    lines.append(f"  manifest: {Path(summary['output']) / 'toy.json'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def _image_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        return check_image_size(value)
    except ValueError as exn:
        raise argparse.ArgumentTypeError(str(exn)) from None


def _turns(text: str) -> int:
    value = int_at_least(1)(text)
    if value > len(IMAGE_TYPES):
        raise argparse.ArgumentTypeError(f"must be at most {len(IMAGE_TYPES)} (one question "
                                         f"per type), got {value}")
    return value


def _extra_colors(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if any(c not in EXTRA_COLORS for c in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(EXTRA_COLORS)}, "
                                         f"comma-separated, got {text!r}")
    return names


def add_toy_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `fusion-data toy`."""
    n = int_at_least(0)
    d = DEFAULTS
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory for the toy datasets (one shard directory per split, "
                             "plus toy.json); toy shards already there are overwritten, a split "
                             "directory holding other shards is refused")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: scenes, captions and the held-out colour-shape pairs; "
                             "the same seed and flags give byte-identical shards (default 0)")
    parser.add_argument("--image-size", type=_image_size, default=32, metavar="PX",
                        help="side of the square images and video frames in pixels, even, "
                             f"{MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE}, e.g. 64 (default 32); sizes "
                             "decord cannot decode (48, 72) are refused")
    parser.add_argument("--n-text", type=n, default=d["n_text"], metavar="N",
                        help=f"text documents: captions, events, facts, Q/A lines (default {d['n_text']})")
    parser.add_argument("--n-image", type=n, default=d["n_image"], metavar="N",
                        help=f"image-caption pairs (default {d['n_image']})")
    parser.add_argument("--n-video", type=n, default=d["n_video"], metavar="N",
                        help=f"video-caption pairs, 8-16 frames at {FPS} fps (default {d['n_video']})")
    parser.add_argument("--n-vqa-train", type=n, default=d["n_vqa_train"], metavar="N",
                        help=f"image VQA training questions (default {d['n_vqa_train']})")
    parser.add_argument("--n-vqa-test", type=n, default=d["n_vqa_test"], metavar="N",
                        help=f"image VQA test questions on seen pairs (default {d['n_vqa_test']})")
    parser.add_argument("--n-vqa-compositional", type=n, default=None, metavar="N",
                        help="image VQA test questions on the held-out colour-shape pairs "
                             "(default: as many as --n-vqa-test)")
    parser.add_argument("--n-video-vqa-train", type=n, default=d["n_video_vqa_train"], metavar="N",
                        help=f"video VQA (direction) training questions (default {d['n_video_vqa_train']})")
    parser.add_argument("--n-video-vqa-test", type=n, default=d["n_video_vqa_test"], metavar="N",
                        help=f"video VQA (direction) test questions (default {d['n_video_vqa_test']})")
    parser.add_argument("--vqa-turns", type=_turns, default=d["vqa_turns"], metavar="N",
                        help="questions per vqa_image_train record, 1-5: the balanced question, "
                             "then up to N-1 more about the same picture, one per other type "
                             "with a right answer there, stored as the record's `turns` (test "
                             f"sets keep one question per record; default {d['vqa_turns']})")
    parser.add_argument("--extra-colors", type=_extra_colors, default=d["extra_colors"], metavar="C,C",
                        help=f"colours ({', '.join(EXTRA_COLORS)}) that distractor objects in the "
                             "training splits may also wear, named in captions, never asked about: "
                             "every shape is seen in more colours (default: none)")
    parser.add_argument("--samples-per-shard", type=int_at_least(1), default=d["samples_per_shard"],
                        metavar="N", help=f"samples per tar shard (default {d['samples_per_shard']})")
    parser.add_argument("--workers", type=int_at_least(1), default=default_workers(), metavar="N",
                        help="processes writing shards; the output does not depend on it "
                             "(default: CPUs, at most 8)")


def run_toy(args: argparse.Namespace) -> int:
    """`fusion-data toy`: generate, print the summary, return 0."""
    try:
        summary = generate_toy(
            args.output, seed=args.seed, image_size=args.image_size, n_text=args.n_text,
            n_image=args.n_image, n_video=args.n_video, n_vqa_train=args.n_vqa_train,
            n_vqa_test=args.n_vqa_test, n_vqa_compositional=getattr(args, "n_vqa_compositional", None),
            n_video_vqa_train=args.n_video_vqa_train, n_video_vqa_test=args.n_video_vqa_test,
            samples_per_shard=args.samples_per_shard, workers=getattr(args, "workers", 1),
            vqa_turns=getattr(args, "vqa_turns", DEFAULTS["vqa_turns"]),
            extra_colors=getattr(args, "extra_colors", DEFAULTS["extra_colors"]))
    except (ValueError, OSError) as exn:

        raise CliError(str(exn)) from exn
    print(format_summary(summary))
    return 0
