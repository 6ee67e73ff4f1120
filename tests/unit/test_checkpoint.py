import torch

import fusion
from fusion.checkpoint import export_model, set_rng_state, rng_state
from fusion.config import load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model


def test_export_then_load_model_gives_the_same_logits(tmp_path):
    cfg = load_config(None, ["model.moe.balance=bias", "model.vision.pixel_shuffle=true", "model.tie_embeddings=true",
                             "model.vision.img_size=32", "model.vision.patch_size=8", "model.dim=48"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ByteTokenizer()).eval()
    model.moe_layers[0].router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.2]))
    step = tmp_path / "run" / "checkpoints" / "step_3"
    export_model(model, cfg, step)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_3")
    loaded = fusion.load_model(tmp_path / "run")
    x = torch.randint(0, 256, (2, 10))
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(loaded.moe_layers[0].router.expert_bias, model.moe_layers[0].router.expert_bias)
    assert loaded.cfg.vision.pixel_shuffle and loaded.cfg.dim == 48


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
