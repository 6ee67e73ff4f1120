"""The toy world's language: captions of scenes and events, facts for the text corpus, and the
questions about a scene or a clip with exactly one right answer.
(fusion/data/toy/__init__.py describes the world.)"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fusion.data.tokenizer_train import WORD_PATTERN
from fusion.data.toy.scenes import PlacementError, place_scene, placement_bounds, side_of
from fusion.data.toy.world import (
    CAPTION_BAND,
    CLEARANCE,
    COLORS,
    COUNT_WORDS,
    DIRECTIONS,
    MIN_TRAVEL,
    PAIRS,
    POSITION_MARGIN,
    QUESTIONS,
    SHAPES,
    SIZE_RANGE,
    World,
    named,
)

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
    return rng.choice(
        [
            f"{parts}.",
            f"{COUNT_WORDS[n]} {'object' if n == 1 else 'objects'}: {parts}.",
            f"a picture of {parts}.",
        ]
    )


def describe_event(rng: random.Random, scene: Sequence[dict], event: dict, s: int) -> str:
    """'a red circle moves to the left. a blue square on the right stays still.'"""
    obj = scene[event["index"]]
    if event["kind"] == "move":
        d = event["direction"]
        phrase = f"to the {d}" if d in ("left", "right") else d
        first = rng.choice(
            [
                f"{named(obj)} moves {phrase}.",
                f"{named(obj, True)} moves {phrase}.",
                f"{named(obj)} {where(obj, s)} moves {phrase}.",
            ]
        )
    elif event["kind"] == "appear":
        first = rng.choice(
            [f"{named(obj)} appears {where(obj, s)}.", f"suddenly {named(obj)} appears {where(obj, s)}."]
        )
    else:
        first = rng.choice(
            [
                f"{named(obj, True)} turns {event['color']}.",
                f"{named(obj)} {where(obj, s)} changes color to {event['color']}.",
            ]
        )
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


def _pick(
    rng: random.Random,
    pool: Sequence[tuple[str, str]],
    *,
    not_color: str | None = None,
    not_shape: str | None = None,
    not_pair: tuple[str, str] | None = None,
) -> tuple[str, str]:
    options = [p for p in pool if p[0] != not_color and p[1] != not_shape and p != not_pair]
    return rng.choice(options)


def make_image_question(
    rng: random.Random,
    world: World,
    qtype: str,
    answer: str,
    compositional: bool = False,
    training: bool = False,
) -> tuple[list[dict], str]:
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
        else:  # hard negatives: the colour or the shape is there, alone
            near = [p for p in near_pool if (p[0] == color) != (p[1] == shape)]
            pairs = [rng.choice(near)] + others
        question = QUESTIONS["exists"].format(color=color, shape=shape)
    else:
        raise ValueError(f"not an image question type: {qtype!r}")
    return place_scene(rng, s, pairs, first_side=side), question


def _wholly_on_one_side(obj: dict, s: int) -> bool:
    """obj is as far off the midline as a `position` question's object is placed."""
    return abs(obj["x"] - s / 2) >= max(POSITION_MARGIN * s, CLEARANCE * obj["size"] + 1.0)


def scene_question(
    rng: random.Random,
    world: World,
    scene: Sequence[dict],
    qtype: str,
    named: set[tuple[str, str]] = frozenset(),
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
        return (
            QUESTIONS["position"].format(color=o["color"], shape=o["shape"]),
            side_of(o["x"], s),
            (o["color"], o["shape"]),
        )
    if qtype == "exists":
        absent = [p for p in world.seen if p not in pairs and p not in named]
        near = [p for p in absent if any(p[0] == c or p[1] == sh for c, sh in pairs)]
        if not (single and absent):  # only when either answer could be asked: yes / no even
            return None
        if rng.random() < 0.5:
            pair, answer = rng.choice(single), "yes"
        else:
            pair, answer = rng.choice(near or absent), "no"
        return QUESTIONS["exists"].format(color=pair[0], shape=pair[1]), answer, pair
    raise ValueError(f"not an image question type: {qtype!r}")


def question_pair(qtype: str, question: str, answer: str) -> tuple[str, str] | None:
    """The colour-shape pair a question spells out together with its answer (None: count)."""
    words = WORD_PATTERN.findall(question)
    color = next((w for w in words if w in COLORS), answer if qtype == "color" else None)
    shape = next((w for w in words if w in SHAPES), answer if qtype == "shape" else None)
    return (color, shape) if color and shape else None


def make_motion(
    rng: random.Random,
    world: World,
    pair: tuple[str, str],
    direction: str,
    n_others: int,
    pool: Sequence[tuple[str, str]],
) -> tuple[list[dict], dict]:
    """A mover of `pair` travelling `direction` by at least MIN_TRAVEL * S, plus `n_others` still
    objects clear of its path (none of them the mover's pair). Returns (scene, event)."""
    s = world.size
    dx, dy = DIRECTIONS[direction]
    for _ in range(200):
        size = round(rng.uniform(SIZE_RANGE[0] * s, SIZE_RANGE[1] * s), 2)
        lo, hi = placement_bounds(size, s)
        travel = rng.uniform(MIN_TRAVEL * s, hi - lo)
        start = [rng.uniform(lo, hi), rng.uniform(lo, hi)]
        for axis, d in ((0, dx), (1, dy)):  # the moving axis: start where the travel fits
            if d:
                start[axis] = rng.uniform(lo, hi - travel) if d > 0 else rng.uniform(lo + travel, hi)
        mover = {
            "shape": pair[1],
            "color": pair[0],
            "x": round(start[0], 2),
            "y": round(start[1], 2),
            "size": size,
        }
        x1, y1 = round(mover["x"] + dx * travel, 2), round(mover["y"] + dy * travel, 2)
        others = [_pick(rng, pool, not_pair=pair) for _ in range(n_others)]
        try:
            scene = place_scene(rng, s, others, path=(mover, x1, y1), fixed=[mover])
        except PlacementError:
            n_others = max(0, n_others - 1)
            continue
        return scene, {"kind": "move", "index": 0, "direction": direction, "x1": x1, "y1": y1}
    raise PlacementError(f"cannot place a moving object in a {s}x{s} frame")


def make_event(rng: random.Random, world: World, kind: str, n_frames: int) -> tuple[list[dict], dict]:
    """A caption video's scene and event of `kind` in a clip of `n_frames`, seen pairs only
    (before and after a change)."""
    seen = world.seen
    n_others = rng.randint(0, 2)
    if kind == "move":
        return make_motion(rng, world, rng.choice(seen), rng.choice(tuple(DIRECTIONS)), n_others, seen)
    pair = rng.choice(seen)
    scene = place_scene(rng, world.size, [pair] + [_pick(rng, seen, not_pair=pair) for _ in range(n_others)])
    frame = rng.randint(max(1, n_frames // 4), max(1, (3 * n_frames) // 4))  # never the first
    if kind == "appear":
        return scene, {"kind": "appear", "index": 0, "frame": frame}
    color = rng.choice([c for c, sh in seen if sh == pair[1] and c != pair[0]])
    return scene, {"kind": "change", "index": 0, "color": color, "frame": frame}
