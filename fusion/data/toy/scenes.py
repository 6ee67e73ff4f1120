"""Scenes and pictures: placing objects without overlap, rendering images and clips, encoding PNG
and H.264.
(fusion/data/toy/__init__.py describes the world.)"""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Sequence

import numpy as np

from fusion.data.toy.world import (
    BACKGROUND,
    CLEARANCE,
    CRF,
    FPS,
    GOP,
    POSITION_MARGIN,
    RGB,
    SIZE_RANGE,
    SQUARE_HALF,
)
from fusion.data.video import (
    encode_frames,
    probe,
)

# ---------------------------------------------------------------- scenes


class PlacementError(RuntimeError):
    """No non-overlapping placement found (too many or too large objects for the image)."""


def placement_bounds(size: float, s: int) -> tuple[float, float]:
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


def place_scene(
    rng: random.Random,
    s: int,
    pairs: Sequence[tuple[str, str]],
    *,
    first_side: str | None = None,
    path: tuple[dict, float, float] | None = None,
    fixed: Sequence[dict] = (),
) -> list[dict]:
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
                lo, hi = placement_bounds(size, s)
                if k == 0 and first_side is not None:
                    off = max(POSITION_MARGIN * s, CLEARANCE * size + 1.0)
                    lo_x, hi_x = (lo, s / 2 - off) if first_side == "left" else (s / 2 + off, hi)
                    if lo_x > hi_x:
                        continue
                    x = rng.uniform(lo_x, hi_x)
                else:
                    x = rng.uniform(lo, hi)
                obj = {
                    "shape": shape,
                    "color": color,
                    "x": round(x, 2),
                    "y": round(rng.uniform(lo, hi), 2),
                    "size": size,
                }
                if all(_clear(obj, other) for other in placed) and (
                    path is None or _clear_of_path(obj, path)
                ):
                    placed.append(obj)
                    break
            else:
                break  # this object found no room: start over
        else:
            return placed
    raise PlacementError(f"cannot place {len(pairs)} objects in a {s}x{s} image")


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=8)
def _pixel_centres(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5  # (S, S) each
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
    if obj["shape"] == "triangle":  # apex up at (0, -r), base corners (+-r*sqrt3/2, r/2)
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
        return {
            **obj,
            "x": obj["x"] + a * (event["x1"] - obj["x"]),
            "y": obj["y"] + a * (event["y1"] - obj["y"]),
        }
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
    return np.stack(frames)  # (F, S, S, 3)


def encode_png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = FPS) -> bytes:
    """H.264 yuv420p mp4 of uint8 (F, H, W, 3) frames: one thread, no B-frames, short GOP, so the
    bytes depend only on the frames (and the x264 build)."""
    return encode_frames(frames, fps, crf=CRF, keyframe_interval=GOP, preset="medium", scene_cuts=True)


def video_meta(data: bytes) -> dict:
    """{fps, n_frames (decoded), duration, width, height} of an encoded clip, read back by PyAV."""
    meta = probe(data, backend="pyav")
    return {
        "fps": meta.fps,
        "n_frames": meta.n_frames,
        "duration": round(meta.duration, 6),
        "width": meta.width,
        "height": meta.height,
    }
