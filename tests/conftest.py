"""Shared fixtures: tiny corpora and shards made inside the tests (nothing is downloaded)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]


def toy_sentences(n: int, seed: int = 0) -> list[str]:
    """Templated sentences a tiny model learns quickly (repetitive, low entropy)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, s = rng.choice(COLORS), rng.choice(SHAPES)
        out.append(
            rng.choice(
                [
                    f"the {c} {s} is on the left.",
                    f"a {c} {s} moves to the right.",
                    f"Q: what color is the {s}? A: {c}.",
                    f"there is one {c} {s} in the picture.",
                ]
            )
        )
    return out


def text_rows(tokenizer, n: int = 8, T: int = 48, seed: int = 0):
    """(input_ids, labels) of n byte-tokenised toy sentences, one per row; padding has label -100."""
    import torch

    from fusion.schema import IGNORE

    ids = torch.full((n, T), tokenizer.pad_id)
    labels = torch.full((n, T), IGNORE)
    for i, text in enumerate(toy_sentences(n, seed)):
        t = ([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id])[:T]
        ids[i, : len(t)] = torch.tensor(t)
        labels[i, : len(t) - 1] = torch.tensor(t[1:])
    return ids, labels


def random_pixels(*shape, seed: int = 0):
    """uint8 pixels of `shape`, reproducible per seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def packed_batch(tokenizer, samples, seq_len: int):
    """Collated rows of `samples` [(parts, modality, media kwargs)] packed to seq_len."""
    from fusion.data.sequence import Packer, build_sample, collate

    p = Packer(seq_len, tokenizer.pad_id)
    for parts, modality, media in samples:
        tokens, mask, min_pairs = build_sample(tokenizer, parts)
        p.add(tokens, modality, mask, min_pairs=min_pairs, **media)
    p.flush()
    return collate(p.ready)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leaked_shm_buffers(cmd: list[str]) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers still in /dev/shm for the --master_port of launcher `cmd`."""
    port = cmd[cmd.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def run_cli(args: list[str], timeout: float = 600, env: dict | None = None, cwd=ROOT):
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory) -> Path:
    """400 toy documents in 4 text shards, built by `fusion-data text`."""
    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(toy_sentences(400)) + "\n")
    out = root / "shards"
    r = run_cli(
        [
            str(BIN / "fusion-data"),
            "text",
            "--input",
            str(corpus),
            "--output",
            str(out),
            "--samples-per-shard",
            "100",
        ]
    )
    assert r.returncode == 0, r.stderr
    return out


RGB = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}


def square_frame(color: str, x: int, y: int, size: int = 32, side: int = 10):
    import numpy as np

    img = np.full((size, size, 3), 30, np.uint8)
    img[y : y + side, x : x + side] = RGB[color]
    return img


def encode_mp4(frames, fps: int = 8) -> bytes:
    """H.264 mp4 bytes from uint8 (H, W, 3) frames, written with PyAV."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "g": "4", "bf": "0", "threads": "1"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> Path:
    """60 captioned 32x32 PNGs (one coloured square) in 3 shards."""
    import io

    from PIL import Image

    from fusion.data.shards import write_index
    from fusion.data.tar import ShardWriter

    out = tmp_path_factory.mktemp("image") / "shards"
    rng = random.Random(1)
    colors = list(RGB)
    for s in range(3):
        with ShardWriter(out, s) as w:
            for i in range(20):
                color = colors[(s * 20 + i) % len(colors)]
                x = rng.randint(0, 22)
                buf = io.BytesIO()
                Image.fromarray(square_frame(color, x, rng.randint(0, 22))).save(buf, format="PNG")
                side = "left" if x < 11 else "right"
                w.write(
                    f"img{s}_{i:03d}",
                    {
                        "png": buf.getvalue(),
                        "txt": f"a {color} square on the {side}.",
                        "json": {"width": 32, "height": 32, "source": "test"},
                    },
                )
    write_index(out, "image")
    return out


@pytest.fixture(scope="session")
def video_shards(tmp_path_factory) -> Path:
    """16 captioned 8-frame 32x32 clips (a square moving left or right) in 2 shards."""
    from fusion.data.shards import write_index
    from fusion.data.tar import ShardWriter

    out = tmp_path_factory.mktemp("video") / "shards"
    colors = list(RGB)
    for s in range(2):
        with ShardWriter(out, s) as w:
            for i in range(8):
                color, right = colors[(s * 8 + i) % len(colors)], (i % 2 == 0)
                xs = [2 + 2 * f for f in range(8)]
                frames = [square_frame(color, x if right else 22 - (x - 2), 11) for x in xs]
                w.write(
                    f"vid{s}_{i:03d}",
                    {
                        "mp4": encode_mp4(frames),
                        "txt": f"a {color} square moves {'right' if right else 'left'}.",
                        "json": {"fps": 8.0, "n_frames": 8, "duration": 1.0, "width": 32, "height": 32},
                    },
                )
    write_index(out, "video")
    return out


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> Path:
    """A small toy world from `fusion-data toy` (all splits, a few shards each)."""
    out = tmp_path_factory.mktemp("toy") / "world"
    r = run_cli(
        [
            str(BIN / "fusion-data"),
            "toy",
            "--output",
            str(out),
            "--n-text",
            "40",
            "--n-image",
            "40",
            "--n-video",
            "8",
            "--n-vqa-train",
            "60",
            "--n-vqa-test",
            "30",
            "--n-video-vqa-train",
            "8",
            "--n-video-vqa-test",
            "8",
            "--samples-per-shard",
            "20",
        ]
    )
    assert r.returncode == 0, r.stderr
    return out
