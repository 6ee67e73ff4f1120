"""The loader's fast paths: chunked worker messages, the main-process path, the one-pass crop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from fusion.config import load_config
from fusion.data.mixing import ModalityRows, build_batches
from fusion.data.samples import square_frames, square_pixels
from fusion.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def cfg_for(workers: int, **data):
    over = [f"data.{k}={v}" for k, v in data.items()]
    return load_config(
        None,
        [
            "train.seq_len=160",
            "train.micro_batch=2",
            "data.shuffle_buffer=8",
            f"data.num_workers={workers}",
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "data.n_frames=4",
            *over,
        ],
    )


def batches(b, n):
    return [next(b) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_one_worker_yields_what_the_main_process_yields(text_shards, image_shards):
    # one worker reads the same sub-stream as no worker: chunking must not reorder anything
    spec = {"text": text_shards, "image": image_shards}
    assert_same(
        batches(build_batches(cfg_for(0, **spec), TOK, 0, 1), 6),
        batches(build_batches(cfg_for(1, **spec), TOK, 0, 1), 6),
    )


@pytest.mark.parametrize("chunk,cut", [(5, 1), (5, 2), (5, 3), (1, 2)])
def test_resume_in_the_middle_of_a_worker_chunk(text_shards, image_shards, monkeypatch, chunk, cut):
    monkeypatch.setattr(ModalityRows, "CHUNK", chunk)
    cfg = cfg_for(2, text=text_shards, image=image_shards)
    a = build_batches(cfg, TOK, 0, 1)
    batches(a, cut)
    state = a.state_dict()
    consumed = [s["consumed"] for s in state["sources"].values()]
    expected = batches(a, 5)
    b = build_batches(cfg, TOK, 0, 1)
    b.load_state_dict(state)
    assert_same(expected, batches(b, 5))
    if (chunk, cut) == (5, 3):  # chosen so that some stream stops part-way through a chunk
        assert any(c % chunk for c in consumed), consumed


def reference_crop(img: Image.Image, size: int, x0: int, y0: int) -> np.ndarray:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    return np.asarray(img.crop((x0, y0, x0 + size, y0 + size))).transpose(2, 0, 1)


@pytest.mark.parametrize("w,h", [(96, 64), (64, 160), (48, 48), (32, 40)])
def test_one_pass_crop_equals_resize_then_crop(w, h):
    rs = np.random.default_rng(w * h)
    smooth = Image.fromarray(rs.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8))
    img = smooth.resize((w, h), Image.BICUBIC)
    size = 32
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    got = square_pixels(img, size, train=False, rng=random.Random(0))
    want = reference_crop(img, size, (nw - size) // 2, (nh - size) // 2)
    assert got.shape == (3, size, size) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 2
    # training: the offset drawn along the longer side is the one the crop uses
    rng = random.Random(7)
    got = square_pixels(img, size, train=True, rng=rng)
    rng = random.Random(7)
    x0, y0 = rng.randint(0, nw - size), rng.randint(0, nh - size)
    assert np.abs(got.astype(int) - reference_crop(img, size, x0, y0)).max() <= 2


def test_every_frame_of_a_clip_gets_the_same_crop():
    rs = np.random.default_rng(0)
    frames = rs.integers(0, 256, (3, 40, 72, 3), dtype=np.uint8)
    out = square_frames(frames, 32, train=True, rng=random.Random(5))
    assert out.shape == (3, 3, 32, 32)
    for i in range(3):
        one = square_pixels(Image.fromarray(frames[i]), 32, train=True, rng=random.Random(5))
        assert np.array_equal(out[i], one)
