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
        out.append(rng.choice([
            f"the {c} {s} is on the left.",
            f"a {c} {s} moves to the right.",
            f"Q: what color is the {s}? A: {c}.",
            f"there is one {c} {s} in the picture.",
        ]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    r = run_cli([str(BIN / "fusion-data"), "text", "--input", str(corpus), "--output", str(out),
                 "--samples-per-shard", "100"])
    assert r.returncode == 0, r.stderr
    return out
