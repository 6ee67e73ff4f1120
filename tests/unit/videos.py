"""Tiny test videos written with PyAV, whose frames can be identified after decoding.

Frame i is a flat gray of level `frame_level(i)` with a pure red 8x8 block in the top-left
corner (to catch RGB/BGR mix-ups). H.264 at crf 0, yuv420p, a keyframe every `gop` frames and no
B-frames: only the RGB <-> YUV conversion changes pixel values (by a few levels).
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

LEVEL_STEP = 10
MAX_FRAMES = 23  # levels 16 .. 236 stay inside the limited-range YUV gray scale


def frame_level(i: int) -> int:
    return 16 + LEVEL_STEP * i


def frame_ids(frames: np.ndarray) -> list[int]:
    """The frame number of each decoded frame (F, H, W, 3), read from the gray level."""
    below_red_block = frames[:, frames.shape[1] // 2 :]  # (F, H/2, W, 3)
    gray = below_red_block.reshape(len(frames), -1).mean(axis=1)
    return [int(round((g - 16) / LEVEL_STEP)) for g in gray]


def make_frame(i: int, height: int, width: int) -> np.ndarray:
    img = np.full((height, width, 3), frame_level(i), np.uint8)
    img[:8, :8] = (255, 0, 0)
    return img


def encode_video(
    n_frames: int = 20,
    height: int = 32,
    width: int = 40,
    fps: int = 10,
    gop: int = 4,
    faststart: bool = False,
) -> bytes:
    """An H.264 mp4 as bytes. faststart puts the index (moov) before the media data (mdat)."""
    import av

    assert n_frames <= MAX_FRAMES
    with tempfile.TemporaryDirectory() as tmp:  # faststart rewrites the file: needs a path
        path = os.path.join(tmp, "v.mp4")
        options = {"movflags": "faststart"} if faststart else {}
        with av.open(path, "w", format="mp4", options=options) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "0", "g": str(gop), "bf": "0"}
            for i in range(n_frames):
                frame = av.VideoFrame.from_ndarray(make_frame(i, height, width), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        with open(path, "rb") as f:
            return f.read()


def encode_empty_video() -> bytes:
    """An mp4 with a declared H.264 stream and no frames in it."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    return buf.getvalue()


def encode_audio_only(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """An mp4 holding one AAC audio stream (a 440 Hz tone) and no video."""
    import av

    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # (channels, samples)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for start in range(0, tone.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()
