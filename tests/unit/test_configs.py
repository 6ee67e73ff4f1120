"""Every shipped config (configs/*.yaml) takes every modality at its own vision settings: with
data.text, data.image and data.video set, it loads and finalizes (a row holds one image and one
video of data.n_frames frames; README "How media become tokens" gives the token counts)."""

from __future__ import annotations

import pytest

from fusion.config import finalize, load_config
from fusion.schema import tokens_per_image, tokens_per_video
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_found():
    assert {p.name for p in CONFIGS} >= {"debug.yaml", "demo.yaml", "small.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_accepts_text_image_and_video(path):
    cfg = load_config(path, ["data.text=shards/text", "data.image=shards/image", "data.video=shards/video"])
    derived = finalize(cfg, world_size=1)
    v = cfg.model.vision
    assert derived.image_tokens == tokens_per_image(v) + 2 <= cfg.train.seq_len
    assert derived.video_tokens == tokens_per_video(v, cfg.data.n_frames) <= cfg.train.seq_len
