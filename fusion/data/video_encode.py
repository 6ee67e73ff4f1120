"""H.264 encoding with PyAV (libx264, yuv420p mp4, video only), deterministic: one encoder thread
and fixed options give byte-identical bytes for the same input and settings (a resumed shard build
and the toy generator depend on it). No B-frames and a keyframe every `keyframe_interval` frames
(plus x264's scene cuts if asked for), so a reader seeking to any frame decodes at most that many.

    encode_frames(frames, fps, crf=, keyframe_interval=, preset=, scene_cuts=) -> mp4 bytes
    encoded_size(width, height, max_side) -> (width, height)

This module owns the encoder: the x264 options (`x264_options`), writing the mp4 (`write_h264`),
RGB frames to yuv420p planes in numpy (`rgb_to_yuv420p`), resizing decoded frames to yuv420p
(`to_yuv420p`), constant-rate retiming (`retime`) and the stored
size (`encoded_size`: even sides, no width in DECORD_BAD_WIDTHS). Reading a source video to
re-encode it (`transcode`) is `fusion.data.video`'s, which re-exports these names. PyAV is imported
only when a function runs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from fractions import Fraction

import numpy as np

# decord 0.6.0 returns frames of a wrong shape for these widths (even widths 2..2100 were tried with
# yuv420p H.264; heights 2..198 all decode). tests/unit/test_build_media.py checks the neighbours.
DECORD_BAD_WIDTHS = frozenset({2, 4, 6, 8, 12, 16, 24, 48, 72})
MIN_VIDEO_WIDTH = 10


def encode_frames(
    frames: np.ndarray,
    fps: int | Fraction,
    *,
    crf: int,
    keyframe_interval: int,
    preset: str = "medium",
    scene_cuts: bool = False,
) -> bytes:
    """H.264 yuv420p mp4 of uint8 (F, H, W, 3) RGB frames (H and W even), `fps` frames a second.

    scene_cuts=True keeps x264's scene-cut detection, which may add keyframes between the regular
    ones; the toy generator's clips have always been encoded that way.
    """
    import av

    height, width = frames.shape[1], frames.shape[2]
    # The encoder numbers the frames 0, 1, ...; the pixels arrive as yuv420p already, converted here
    # in plain arithmetic rather than by swscale, whose rounding is the FFmpeg build's own.
    yuv = (av.VideoFrame.from_ndarray(planes, format="yuv420p") for planes in rgb_to_yuv420p(frames))
    return write_h264(yuv, fps, width, height, x264_options(crf, keyframe_interval, preset, scene_cuts))


# BT.601 with studio range (Y 16-235, Cb / Cr 16-240): what a decoder assumes of an H.264 stream
# that names no colour space, as these do. Rows give Y, Cb, Cr from R, G, B in 0..255.
_BT601 = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255.0
_BT601_OFFSET = np.array([16.0, 128.0, 128.0])


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, 3) RGB (H and W even) -> uint8 (F, H * 3 // 2, W): each frame's Y plane,
    then its Cb and Cr planes at half resolution (each from the mean colour of a 2x2 block), one
    after the other in memory, the layout `av.VideoFrame.from_ndarray(..., format="yuv420p")`
    takes. Plain float64 arithmetic, rounded half to even: the same frames give the same planes
    with any FFmpeg build."""
    f, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sides, got {w}x{h}")
    rgb = frames.astype(np.float64)
    luma = rgb @ _BT601[0] + _BT601_OFFSET[0]  # (F, H, W)
    blocks = rgb.reshape(f, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))  # (F, H/2, W/2, 3)
    chroma = blocks @ _BT601[1:].T + _BT601_OFFSET[1:]  # (F, H/2, W/2, 2)
    planes = [luma.reshape(f, -1), chroma[..., 0].reshape(f, -1), chroma[..., 1].reshape(f, -1)]
    flat = np.clip(np.rint(np.concatenate(planes, axis=1)), 0, 255).astype(np.uint8)  # (F, 3HW/2)
    return flat.reshape(f, h * 3 // 2, w)


def encoded_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Stored (width, height): the longer side at most `max_side` (0 = keep), both even (yuv420p),
    and a width decord 0.6.0 decodes (the nearest one below in DECORD_BAD_WIDTHS, at least 10)."""
    scale = min(1.0, max_side / max(width, height)) if max_side > 0 else 1.0

    def even(x: float) -> int:
        return max(2, int(x + 0.5) // 2 * 2)

    w, h = even(width * scale), even(height * scale)
    while w in DECORD_BAD_WIDTHS and w > MIN_VIDEO_WIDTH:
        w -= 2
    return max(w, MIN_VIDEO_WIDTH), h


def x264_options(crf: int, keyframe_interval: int, preset: str, scene_cuts: bool) -> dict:
    options = {"crf": str(crf), "g": str(keyframe_interval), "bf": "0"}
    if not scene_cuts:
        options["sc_threshold"] = "0"
    options.update(preset=preset, threads="1")  # = thread_count 1, set on the stream too
    # x264's macroblock tree (on by default with crf) is not repeatable: with one thread, the same
    # frames encoded over and over in one process came out different in 35 of 20,000 encodes;
    # without it, in none (tools/check_encoder_determinism.py --runs 20000).
    options["x264-params"] = "mbtree=0"
    return options


def write_h264(frames: Iterable, rate: int | Fraction, width: int, height: int, options: dict) -> bytes:
    """An mp4 of the av.VideoFrames encoded by libx264 at `rate`, as bytes."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # threads make x264 nondeterministic
        stream.options = options
        for frame in frames:
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return buf.getvalue()


def to_yuv420p(frames: Iterable, width: int, height: int, rate: Fraction) -> Iterator:
    """Decoded frames resized (bicubic) to yuv420p, numbered 0, 1, ... at `rate`."""
    for n, frame in enumerate(frames):
        out = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
        out.pts, out.time_base = n, 1 / rate
        out.pict_type = 0  # NONE: a decoded I frame would force a keyframe in libx264
        yield out


def retime(frames: Iterable, src_rate: Fraction | None, out_rate: Fraction) -> Iterator:
    """Frames at `out_rate`: output frame j shows the last source frame whose time <= j / out_rate
    (frames dropped or repeated, as ffmpeg's fps filter does)."""
    step = 1 / float(out_rate)
    src_step = 1 / float(src_rate) if src_rate else step
    prev, prev_t, t0, j = None, 0.0, None, 0
    for i, frame in enumerate(frames):
        t = frame.time if frame.time is not None else i * src_step
        t0 = t if t0 is None else t0
        t -= t0
        while prev is not None and j * step < t - 1e-9:
            yield prev
            j += 1
        prev, prev_t = frame, t
    if prev is not None:
        while j * step < prev_t + src_step - 1e-9:  # the last frame lasts one source frame
            yield prev
            j += 1
