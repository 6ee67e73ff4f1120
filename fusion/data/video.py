"""Video decoding and H.264 encoding; the only module that imports decord, and with
`fusion.data.video_encode` (the encoder, whose names it re-exports) the only ones that import
PyAV (`av`).

    decode(data, indices, backend="auto", size=None, timeout=None, stats=None) -> uint8 (F, H, W, 3)
    probe(data, backend="auto", timeout=None, stats=None) -> VideoMeta
    encode_frames(frames, fps, crf=, keyframe_interval=, preset=, scene_cuts=) -> mp4 bytes
    transcode(data, fps=, max_side=, crf=, keyframe_interval=, preset=) -> mp4 bytes
    container_format(data) -> str        measure(data) -> VideoMeta        (shard builders)
    encoded_size(width, height, max_side) -> (width, height)
    backend_available(backend) -> bool   encoder_available(codec) -> bool

`data` is a whole video file as bytes (a shard member); nothing touches the filesystem. `decode`
returns exactly the requested frames, in the requested order, duplicates included. Indices past
the last decoded frame are clamped to it (containers over-report their frame count; FIELD-NOTES).

Backends
- "decord": `VideoReader(BytesIO, num_threads=1)` (threads inside data-loader workers oversubscribe
  the cores), one `get_batch` over the distinct indices, then `seek(0)` to release the decoder's
  buffered frames (decord #208: memory grows otherwise). The frame count is `len(VideoReader)`,
  which is what the container index says.
- "pyav": sequential decode from the start, no seeking (decord's seek-based reads return wrong
  frames on some real videos: #54, #91, #195), stopping after the last wanted frame. `probe`
  decodes every frame and counts them.
- "auto" (default): decord, falling back to PyAV for this one sample when decord raises or times
  out (counted in `DecodeStats.fallbacks`). If decord is not installed, PyAV alone.

Failures raise `VideoDecodeError` whose `reason` is one of REASONS, so the loader and the shard
builder can count them: "empty" (0 bytes), "unreadable" (the container does not open: garbage,
a truncated file whose index is missing), "corrupt" (it opens but decoding fails: e.g. a truncated
media payload), "no_video_stream" (e.g. audio only), "zero_frames", "timeout", and from the
builders' strict reading only (below) "unsupported_format".

Timeouts run the decode in a daemon thread and stop *waiting* after `timeout` seconds. Python
cannot kill a thread: the abandoned decode keeps its core (and memory) until the library returns,
and a decoder that spins while holding the GIL (decord #373) also stalls the waiting thread, so
the timeout only fires once the GIL is released. A hard limit needs a subprocess per sample.

Resizing to `size=(H, W)` uses Pillow (bilinear) after decoding, identically for both backends.

Encoding (`fusion.data.video_encode`: PyAV, libx264, yuv420p mp4, video only) is deterministic:
one encoder thread and fixed options give byte-identical bytes for the same input and settings (a
resumed shard build and the toy generator depend on it). No B-frames and a keyframe every
`keyframe_interval` frames (plus x264's scene cuts if asked for), so a reader seeking to any frame
decodes at most that many (decord's seeks are also most reliable without frame reordering).
`encode_frames` writes uint8 RGB frames (the toy world); `transcode` re-encodes any video ffmpeg
reads (the `videos` / `vqa` shard builders), at a constant frame rate and a stored size from
`encoded_size`: even sides (yuv420p) and no width in DECORD_BAD_WIDTHS.

The builders read their inputs more strictly than `decode` / `probe` do: `transcode`,
`container_format` and `measure` also refuse a still image ("unsupported_format": ffmpeg opens a
PNG as a 1-frame video) and a file with fewer packets than its index lists ("corrupt": a file cut
at a packet boundary decodes quietly to fewer frames). Their messages are the builders' own.
"""

from __future__ import annotations

import functools
import io
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from fusion.data.sampling import VideoMeta
from fusion.data.video_encode import (
    DECORD_BAD_WIDTHS,
    MIN_VIDEO_WIDTH,
    encode_frames,
    encoded_size,
    retime,
    to_yuv420p,
    write_h264,
    x264_options,
)

__all__ = [  # the interface; the encoder's names are fusion.data.video_encode's, re-exported
    "BACKENDS",
    "DECORD_BAD_WIDTHS",
    "MIN_VIDEO_WIDTH",
    "REASONS",
    "DecodeStats",
    "VideoDecodeError",
    "backend_available",
    "container_format",
    "decode",
    "encode_frames",
    "encoded_size",
    "encoder_available",
    "measure",
    "probe",
    "transcode",
]

BACKENDS = ("decord", "pyav", "auto")
REASONS = (
    "empty",
    "unreadable",
    "corrupt",
    "no_video_stream",
    "zero_frames",
    "timeout",
    "unsupported_format",
)  # the last: only from the builders' strict reading


class VideoDecodeError(Exception):
    """A video that could not be decoded; `reason` is one of REASONS, `backend` who said so."""

    def __init__(self, reason: str, message: str, backend: str = ""):
        assert reason in REASONS, reason
        self.reason = reason
        self.message = message
        self.backend = backend
        super().__init__(f"{reason}: {message}" + (f" [{backend}]" if backend else ""))


@dataclass
class DecodeStats:
    """Counters a caller passes in and later logs; one per worker, never shared between threads."""

    decoded: int = 0  # calls that returned frames / meta
    fallbacks: int = 0  # auto: decord failed, PyAV was tried
    fallback_reasons: Counter = field(default_factory=Counter)  # decord's reason -> count
    failures: Counter = field(default_factory=Counter)  # raised reason -> count

    def as_dict(self) -> dict[str, int]:
        out = {"decoded": self.decoded, "fallbacks": self.fallbacks}
        out.update({f"fallback/{k}": v for k, v in sorted(self.fallback_reasons.items())})
        out.update({f"failed/{k}": v for k, v in sorted(self.failures.items())})
        return out


# ---------------------------------------------------------------------------------------------
# public interface
# ---------------------------------------------------------------------------------------------


def decode(
    data: bytes,
    indices: list[int],
    backend: str = "auto",
    size: tuple[int, int] | None = None,
    timeout: float | None = None,
    stats: DecodeStats | None = None,
) -> np.ndarray:
    """The frames at `indices` as uint8 (F, H, W, 3) RGB, F = len(indices), in the given order."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("decode: no frame indices requested")
    if min(indices) < 0:
        raise ValueError(f"decode: negative frame index {min(indices)}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"decode: size must be (H, W) with both >= 1, got {size!r}")
    frames = _dispatch("decode", data, indices, backend, timeout, stats)
    return _resize(frames, size) if size is not None else frames


def probe(
    data: bytes, backend: str = "auto", timeout: float | None = None, stats: DecodeStats | None = None
) -> VideoMeta:
    """Frame count, fps, duration (n_frames / fps) and size of a video.

    decord's count is `len(VideoReader)`, taken from the container; PyAV decodes every frame and
    counts them, slower but exact, which is what a shard builder writing `n_frames` wants.
    """
    return _dispatch("probe", data, None, backend, timeout, stats)


def backend_available(backend: str) -> bool:
    """Whether the package behind `backend` ("decord" | "pyav") imports."""
    if backend not in _MODULES:
        raise ValueError(f"video backend {backend!r}: expected one of {tuple(_MODULES)}")
    return _installed(_MODULES[backend])


def encoder_available(codec: str = "libx264") -> bool:
    """Whether PyAV is installed and its FFmpeg can encode with `codec`."""
    if not backend_available("pyav"):
        return False
    import av

    return codec in av.codecs_available


# ---------------------------------------------------------------------------------------------
# backend selection, fallback, timeout
# ---------------------------------------------------------------------------------------------


def _dispatch(
    op: str,
    data: bytes,
    indices: list[int] | None,
    backend: str,
    timeout: float | None,
    stats: DecodeStats | None,
) -> Any:
    """Run `op` ("decode" | "probe") on the chosen backend, with the auto fallback; count it."""
    if backend not in BACKENDS:
        raise ValueError(f"video backend {backend!r}: expected one of {BACKENDS}")
    stats = stats if stats is not None else DecodeStats()
    try:
        if len(data) == 0:
            raise VideoDecodeError("empty", "0 bytes of video data")
        if backend == "auto":
            out = _auto(op, data, indices, timeout, stats)
        else:
            _require(backend)
            out = _with_timeout(lambda: _call(backend, op, data, indices), timeout, backend)
    except VideoDecodeError as e:
        stats.failures[e.reason] += 1
        raise
    stats.decoded += 1
    return out


def _auto(op: str, data: bytes, indices: list[int] | None, timeout: float | None, stats: DecodeStats) -> Any:
    have_decord, have_pyav = _installed("decord"), _installed("av")
    if not have_decord and not have_pyav:
        raise ImportError(
            "video backend 'auto' needs the 'decord' or the 'av' package; neither "
            "is installed (pip install decord av)"
        )
    if have_decord:
        try:
            return _with_timeout(lambda: _call("decord", op, data, indices), timeout, "decord")
        except Exception as e:  # decord's own errors are wrapped; anything else too
            if not have_pyav:
                raise
            stats.fallbacks += 1
            stats.fallback_reasons[getattr(e, "reason", type(e).__name__)] += 1
    return _with_timeout(lambda: _call("pyav", op, data, indices), timeout, "pyav")


def _call(backend: str, op: str, data: bytes, indices: list[int] | None) -> Any:
    # Module globals are looked up at call time, so a test can replace one backend's function.
    if backend == "decord":
        return _decord_decode(data, indices) if op == "decode" else _decord_probe(data)
    return _pyav_decode(data, indices) if op == "decode" else _pyav_probe(data)


def _with_timeout(fn: Callable[[], Any], timeout: float | None, backend: str) -> Any:
    """fn() in a daemon thread, abandoned after `timeout` seconds (see the module docstring)."""
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e

    worker = threading.Thread(target=run, name=f"video-decode-{backend}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise VideoDecodeError(
            "timeout", f"no result after {timeout:g} s; the decode thread is abandoned, not stopped", backend
        )
    if "err" in box:
        raise box["err"]
    return box["out"]


_MODULES = {"decord": "decord", "pyav": "av"}


@functools.cache
def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _require(backend: str) -> None:
    module = _MODULES[backend]
    if not _installed(module):
        raise ImportError(
            f"video backend {backend!r} needs the '{module}' package, which is not "
            f"installed (pip install {'decord' if module == 'decord' else 'av'}), "
            f"or choose another backend"
        )


def _clamp(indices: list[int], n: int) -> np.ndarray:
    return np.minimum(np.asarray(indices, dtype=np.int64), n - 1)


# ---------------------------------------------------------------------------------------------
# decord
# ---------------------------------------------------------------------------------------------


def _open_decord(data: bytes):
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except AssertionError as e:  # decord asserts a positive frame count after opening
        raise VideoDecodeError("zero_frames", str(e), "decord") from e
    except Exception as e:  # RuntimeError("Error reading N bytes..."), DECORDError
        msg = str(e)
        if "cannot find video stream" in msg:
            raise VideoDecodeError("no_video_stream", "no video stream", "decord") from e
        raise VideoDecodeError("unreadable", _first_line(msg), "decord") from e
    if len(reader) <= 0:  # the assertion above is gone under python -O
        raise VideoDecodeError("zero_frames", "container reports 0 frames", "decord")
    return reader


def _decord_decode(data: bytes, indices: list[int]) -> np.ndarray:
    reader = _open_decord(data)
    wanted = _clamp(indices, len(reader))
    unique, inverse = np.unique(wanted, return_inverse=True)  # decode each frame once, sorted
    try:
        batch = _to_numpy(reader.get_batch(unique.tolist()))  # (U, H, W, 3)
        reader.seek(0)  # decord #208: frees buffered frames
    except Exception as e:
        raise VideoDecodeError("corrupt", _first_line(str(e)), "decord") from e
    if batch.ndim != 4 or batch.shape[-1] != 3:
        # decord 0.6.0 misreads some small widths (16, 24, 48, 72): row padding as a 4th channel
        raise VideoDecodeError("corrupt", f"decord gave frames of shape {batch.shape}", "decord")
    return np.ascontiguousarray(batch[inverse], dtype=np.uint8)  # (F, H, W, 3)


def _decord_probe(data: bytes) -> VideoMeta:
    reader = _open_decord(data)
    try:
        fps = float(reader.get_avg_fps())
        height, width = _to_numpy(reader[0]).shape[:2]  # decord exposes no frame size
        reader.seek(0)
    except Exception as e:
        raise VideoDecodeError("corrupt", _first_line(str(e)), "decord") from e
    n = len(reader)
    return VideoMeta(
        n_frames=n, fps=fps, duration=n / fps if fps > 0 else 0.0, width=int(width), height=int(height)
    )


def _to_numpy(x: Any) -> np.ndarray:
    """decord returns its own NDArray, or a torch tensor if someone set the torch bridge."""
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    if hasattr(x, "numpy"):
        return x.numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# PyAV
# ---------------------------------------------------------------------------------------------


def _open_pyav(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # av.error.InvalidDataError and friends
        raise VideoDecodeError("unreadable", _first_line(str(e)), "pyav") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("no_video_stream", "no video stream", "pyav")
    return container


def _pyav_frames(container):
    """Decoded frames of the first video stream, in order; decode errors become 'corrupt'."""
    stream = container.streams.video[0]
    try:
        yield from container.decode(stream)
    except Exception as e:
        raise VideoDecodeError("corrupt", _first_line(str(e)), "pyav") from e


def _pyav_decode(data: bytes, indices: list[int]) -> np.ndarray:
    wanted = set(indices)
    last_wanted = max(indices)
    got: dict[int, np.ndarray] = {}
    last = None  # (index, frame) of the latest decoded frame
    with _open_pyav(data) as container:
        for i, frame in enumerate(_pyav_frames(container)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            last = (i, frame)
            if i >= last_wanted:
                break
        if last is None:
            raise VideoDecodeError("zero_frames", "the stream decoded to 0 frames", "pyav")
        n = last[0] + 1
        if last_wanted >= n:  # the clip ended early: clamp, as decord does
            got[n - 1] = last[1].to_ndarray(format="rgb24")
    return np.stack([got[i] for i in _clamp(indices, n).tolist()])  # (F, H, W, 3)


def _pyav_probe(data: bytes) -> VideoMeta:
    with _open_pyav(data) as container:
        return _count_frames(container, _pyav_frames(container))


def _count_frames(container, frames: Iterable) -> VideoMeta:
    """Meta of the first video stream, counting the decoded `frames`: the header may lie."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    n, width, height = 0, 0, 0
    for frame in frames:
        if n == 0:
            width, height = frame.width, frame.height
        n += 1
    if n == 0:
        raise VideoDecodeError("zero_frames", "the stream decoded to 0 frames", "pyav")
    fps = float(rate) if rate else 0.0
    return VideoMeta(n_frames=n, fps=fps, duration=n / fps if fps > 0 else 0.0, width=width, height=height)


# ---------------------------------------------------------------------------------------------
# re-encoding, and the shard builders' strict reading (PyAV)
# ---------------------------------------------------------------------------------------------


def transcode(
    data: bytes,
    *,
    fps: float = 0.0,
    max_side: int = 0,
    crf: int = 23,
    keyframe_interval: int = 8,
    preset: str = "medium",
) -> bytes:
    """Any video ffmpeg reads -> H.264 (libx264, yuv420p) mp4 bytes, video only.

    Constant frame rate: the source's average rate (`fps` 0) or `fps`, frames dropped or repeated
    to match. Size: `encoded_size(width, height, max_side)`, bicubic. Scene cuts add no keyframes.
    Raises VideoDecodeError (strict reading, see the module docstring).
    """
    with _open_strict(data) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        src_rate = Fraction(rate).limit_denominator(1001) if rate and rate > 0 else None
        out_rate = Fraction(fps).limit_denominator(1001) if fps > 0 else src_rate or Fraction(25)
        frames = _strict_frames(container)
        if fps > 0:
            frames = retime(frames, src_rate, out_rate)
        first = next(frames, None)
        if first is None:
            raise VideoDecodeError("zero_frames", "the stream decoded to 0 frames", "pyav")
        width, height = encoded_size(first.width, first.height, max_side)
        yuv = to_yuv420p(itertools.chain([first], frames), width, height, out_rate)
        return write_h264(
            yuv, out_rate, width, height, x264_options(crf, keyframe_interval, preset, scene_cuts=False)
        )


def container_format(data: bytes) -> str:
    """FFmpeg's name for the container of a video (e.g. "mov,mp4,m4a,3gp,3g2,mj2"), after the
    strict checks of opening it: VideoDecodeError(empty | unreadable | unsupported_format |
    no_video_stream)."""
    with _open_strict(data) as container:
        return container.format.name


def measure(data: bytes) -> VideoMeta:
    """Like probe(backend="pyav"): every frame decoded and counted, but strict (a still image, a
    decode error or a truncated file raise VideoDecodeError); what a builder checks a file with."""
    with _open_strict(data) as container:
        return _count_frames(container, _strict_frames(container))


def _open_strict(data: bytes):
    """The builders' `_open_pyav`: an input container with a video stream, or VideoDecodeError
    (empty | unreadable | unsupported_format | no_video_stream)."""
    import av

    if not data:
        raise VideoDecodeError("empty", "0 bytes", "pyav")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # InvalidDataError: garbage, or an mp4 cut before its index
        raise VideoDecodeError("unreadable", f"does not open: {_exception_line(e)}", "pyav") from e
    name = container.format.name
    if name == "image2" or name.endswith("_pipe"):  # ffmpeg opens a PNG as a 1-frame video
        container.close()
        raise VideoDecodeError("unsupported_format", f"a still image ({name}), not a video", "pyav")
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("no_video_stream", f"streams: {[s.type for s in container.streams]}", "pyav")
    return container


def _strict_frames(container) -> Iterator:
    """The builders' `_pyav_frames`: also raises VideoDecodeError('corrupt') when the file has
    fewer packets than the container's index lists."""
    stream = container.streams.video[0]
    declared = stream.frames
    packets = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                packets += 1
            yield from packet.decode()
    except Exception as e:
        raise VideoDecodeError("corrupt", f"decoding failed: {_exception_line(e)}", "pyav") from e
    if declared and packets < declared:
        raise VideoDecodeError(
            "corrupt",
            f"the index lists {declared} frames, only {packets} are in the file (truncated)",
            "pyav",
        )


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    bilinear = Image.Resampling.BILINEAR
    out = [np.asarray(Image.fromarray(f).resize((width, height), bilinear)) for f in frames]
    return np.stack(out)  # (F, H, W, 3)


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0][:300] if msg.strip() else "(no message)"


def _exception_line(e: BaseException) -> str:
    """The builders' shorter first line: 200 characters, the exception's type if it says nothing."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
