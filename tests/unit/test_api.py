"""The public Python API (README, "Python API"): fusion.load_config, fusion.build_model,
fusion.load_model, and the model's forward for text, images and videos."""

from __future__ import annotations

import pytest
import torch

import fusion
from fusion.checkpoint import export_model
from fusion.config import ConfigError
from fusion.data.sequence import image_run, video_run
from fusion.schema import frame_groups, tokens_per_image


def test_load_config_layers_overrides_on_the_file():
    cfg = fusion.load_config("configs/debug.yaml", ["model.moe.n_experts=8", "train.lr=1e-4"])
    assert cfg.model.size == "debug" and cfg.model.moe.n_experts == 8 and cfg.train.lr == 1e-4
    with pytest.raises(ConfigError, match="model.moe.n_expert'"):
        fusion.load_config(None, ["model.moe.n_expert=8"])


def test_build_model_and_forward_on_text_images_and_videos():
    cfg = fusion.load_config("configs/debug.yaml", ["data.n_frames=4"])
    torch.manual_seed(0)
    model = fusion.build_model(cfg)
    tok = model.tokenizer
    ids = torch.tensor([[tok.bos_id] + tok.encode("a red circle")])
    assert model(ids).shape == (1, ids.shape[1], model.vocab_size)
    v = cfg.model.vision
    n = tokens_per_image(v)
    with_image = torch.tensor([[tok.bos_id, *image_run(tok, n), *tok.encode(" a caption")]])
    pixels = torch.randint(0, 256, (1, 3, v.img_size, v.img_size), dtype=torch.uint8)
    assert model(with_image, images=pixels).shape == (1, with_image.shape[1], model.vocab_size)
    with_video = torch.tensor([[tok.bos_id, *video_run(tok, frame_groups(v, 4), n)]])
    frames = torch.randint(0, 256, (1, 4, 3, v.img_size, v.img_size), dtype=torch.uint8)
    assert model(with_video, videos=frames).shape == (1, with_video.shape[1], model.vocab_size)
    with pytest.raises(ValueError, match=f"{n} image placeholder tokens in input_ids but 0 image"):
        model(with_image)


def test_load_model_gives_back_the_built_model(tmp_path):
    cfg = fusion.load_config("configs/debug.yaml")
    torch.manual_seed(0)
    model = fusion.build_model(cfg)
    export_model(model, cfg, tmp_path)
    loaded = fusion.load_model(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not loaded.training and loaded.tokenizer.vocab_size == model.tokenizer.vocab_size
    torch.testing.assert_close(loaded(ids), model.eval()(ids))
