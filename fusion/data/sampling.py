"""Pure frame-index samplers: which frames of a video become the model's F frames. No I/O.

`sample_frame_indices(meta, cfg, rng)` turns a video's decoded frame count (and fps) into a sorted
list of frame indices, each in [0, meta.n_frames - 1]. The strategies follow the video LLMs:

- `uniform`        cfg.n_frames frames evenly spread over the clip, first and last frame included
                   (Video-LLaVA, Aria, Qwen2-VL's `nframes` branch: round(linspace(0, n - 1, F))).
- `fps`            one frame every 1/cfg.fps seconds, the count capped to [min_frames, max_frames],
                   clamped to the decoded count and rounded down to a multiple of round_to
                   (LLaVA-NeXT; Qwen2-VL: 2 fps, 4..768 frames, rounded to 2).
- `segment_random` the clip is cut into F equal segments and one random frame is taken from each
                   (InternVideo2 / TSN training).
- `segment_middle` the same segments, the middle frame of each: the deterministic evaluation twin.

Spacing is computed in floats (or exact integer arithmetic) and never by stepping an integer
stride, which is how Aria's `int(len / 8) * i` returns frame 0 eight times for a 5-frame clip.

Videos with fewer decoded frames than the requested count F ("short videos") follow `cfg.pad`:

- `repeat_last` every frame once, then the last one repeated up to F (a freeze at the end);
- `loop`        the frames a looping playback would show, F of them, returned sorted: each frame
                appears F // n or F // n + 1 times, the first F % n frames once more;
- `none`        every frame once: the result has only n < F indices.

With `repeat_last` or `loop` the result always has exactly F indices; only `pad="none"` on a short
video returns fewer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

STRATEGIES = ("uniform", "fps", "segment_random", "segment_middle")
PAD_POLICIES = ("repeat_last", "loop", "none")


@dataclass
class FrameSampling:
    """How many frames to take from a video and which ones."""

    strategy: str = "uniform"  # "uniform" | "fps" | "segment_random" | "segment_middle"
    n_frames: int = 8  # frames per video (uniform, segment_*); a multiple of round_to
    fps: float = 2.0  # target frames per second of video (strategy="fps")
    min_frames: int = 4  # lower cap on the fps count (the decoded count still wins)
    max_frames: int = 32  # upper cap on the fps count
    round_to: int = 1  # the count is a multiple of this (2 for Qwen2-VL temporal patches)
    pad: str = "repeat_last"  # short-video policy: "repeat_last" | "loop" | "none"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"FrameSampling.strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.pad not in PAD_POLICIES:
            raise ValueError(f"FrameSampling.pad={self.pad!r}: expected one of {PAD_POLICIES}")
        for name in ("n_frames", "min_frames", "max_frames", "round_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FrameSampling.{name}={value!r}: expected an int >= 1")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"FrameSampling.fps={self.fps!r}: expected a finite number > 0")
        if self.strategy != "fps" and self.n_frames % self.round_to:
            raise ValueError(
                f"FrameSampling.n_frames={self.n_frames} is not a multiple of round_to={self.round_to}"
            )
        if self.strategy == "fps" and self.count_bounds()[0] > self.count_bounds()[1]:
            raise ValueError(
                f"FrameSampling: no multiple of round_to={self.round_to} lies in "
                f"[min_frames={self.min_frames}, max_frames={self.max_frames}]"
            )

    def count_bounds(self) -> tuple[int, int]:
        """(lo, hi): min_frames rounded up and max_frames rounded down to multiples of round_to."""
        r = self.round_to
        return -(-self.min_frames // r) * r, self.max_frames // r * r


@dataclass
class VideoMeta:
    """What a shard's `.json` says about its video. n_frames is the *decoded* count."""

    n_frames: int
    fps: float
    duration: float  # seconds
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("n_frames", "width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"VideoMeta.{name}={value!r}: expected an int >= 0")
        for name in ("fps", "duration"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.floating))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"VideoMeta.{name}={value!r}: expected a finite number >= 0")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VideoMeta:
        """Build from a shard's `.json` dict; raise ValueError naming any missing or bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"video meta: expected a dict, got {type(d).__name__}")
        fields = ("n_frames", "fps", "duration", "width", "height")
        missing = [f for f in fields if f not in d]
        if missing:
            raise ValueError(
                f"video meta is missing field(s) {', '.join(map(repr, missing))} (has: {sorted(d)})"
            )
        values = {}
        for f in ("n_frames", "width", "height"):
            v = d[f]
            if isinstance(v, float) and v.is_integer():
                v = int(v)  # json writers that emit 20.0 for a count
            values[f] = v
        values["fps"], values["duration"] = d["fps"], d["duration"]
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def seconds(self) -> float:
        """Clip length from the decoded count where possible (containers' durations lie)."""
        return self.n_frames / self.fps if self.fps > 0 else self.duration


def frame_count(meta: VideoMeta, cfg: FrameSampling) -> int:
    """The requested count F for this video, before any short-video padding."""
    if cfg.strategy != "fps":
        return cfg.n_frames
    lo, hi = cfg.count_bounds()
    seconds = meta.seconds
    if seconds <= 0:
        raise ValueError(
            f"strategy='fps' needs the clip length: meta has fps={meta.fps} and duration={meta.duration}"
        )
    count = min(max(round(seconds * cfg.fps), lo), hi, meta.n_frames)
    count = count // cfg.round_to * cfg.round_to
    # A clip shorter than round_to frames: ask for round_to and let the pad policy fill it.
    return max(count, cfg.round_to)


def segment_bounds(n: int, count: int) -> np.ndarray:
    """The count + 1 integer bounds of `count` equal segments of [0, n): k is [b[k], b[k + 1])."""
    return np.arange(count + 1, dtype=np.int64) * n // count


def sample_frame_indices(
    meta: VideoMeta, cfg: FrameSampling, rng: np.random.Generator | None = None
) -> list[int]:
    """Sorted frame indices in [0, meta.n_frames - 1]; see the module docstring for the rules.

    Only `segment_random` draws from `rng` (and requires one); the others are deterministic.
    """
    n = int(meta.n_frames)
    if n <= 0:
        raise ValueError(f"cannot sample frames from a video with {n} decoded frames")
    count = frame_count(meta, cfg)

    if count > n:  # short video: every frame, then the pad policy
        frames = list(range(n))
        if cfg.pad == "repeat_last":
            return frames + [n - 1] * (count - n)
        if cfg.pad == "loop":
            return sorted(k % n for k in range(count))
        return frames

    if cfg.strategy == "uniform":
        if count == 1:
            return [(n - 1) // 2]  # the middle, not the (often black) first frame
        # step (n - 1) / (count - 1) >= 1, so the rounded indices are distinct
        return np.rint(np.linspace(0, n - 1, count)).astype(np.int64).tolist()

    bounds = segment_bounds(n, count)  # count <= n: every segment holds >= 1 frame
    start, stop = bounds[:-1], bounds[1:]
    if cfg.strategy in ("segment_middle", "fps"):
        # fps: segments are 1 / fps seconds long when the count is not capped, so their middles
        # are exactly one frame every 1 / fps seconds.
        return (start + (stop - start) // 2).tolist()
    if rng is None:
        raise ValueError(
            "strategy='segment_random' needs an rng (numpy.random.Generator), e.g. "
            "one seeded from the sample key, so that sampling is reproducible"
        )
    return rng.integers(start, stop).tolist()  # one uniform draw per segment, high exclusive
