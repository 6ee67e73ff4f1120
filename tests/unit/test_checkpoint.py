import torch

import fusion
from fusion.checkpoint import export_model, rng_state, set_rng_state
from fusion.config import load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model


def test_export_then_load_model_gives_the_same_logits(tmp_path):
    cfg = load_config(
        None,
        [
            "model.moe.balance=bias",
            "model.vision.pixel_shuffle=true",
            "model.tie_embeddings=true",
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "model.dim=48",
        ],
    )
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


def test_a_tokenizer_file_travels_with_the_export(tmp_path):
    """A run trained with a tokenizer.json exports a copy beside its weights: the checkpoint still
    loads, with the same vocabulary, after the original file is gone and the run is moved."""
    import json
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from fusion.data.tokenizer import build_tokenizer

    tok_path = tmp_path / "words" / "tokenizer.json"
    tok_path.parent.mkdir()
    words = Tokenizer(models.WordLevel({"<unk>": 0, "red": 1, "circle": 2, "?": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tok_path))
    cfg = load_config(None, [f"data.tokenizer={tok_path}", "model.dim=32"])
    tok = build_tokenizer(str(tok_path))
    torch.manual_seed(0)
    model = build_model(cfg.model, tok).eval()
    export_model(model, cfg, tmp_path / "run" / "step_1")
    assert (
        json.loads((tmp_path / "run" / "step_1" / "model.json").read_text())["tokenizer"] == "tokenizer.json"
    )
    shutil.rmtree(tok_path.parent)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    loaded = fusion.load_model(tmp_path / "moved" / "step_1")
    assert loaded.tokenizer.encode("red circle ?") == [1, 2, 3]
    assert loaded.vocab_size == model.vocab_size == tok.vocab_size
    x = torch.tensor([[tok.bos_id, 1, 2, 3]])
    assert torch.equal(model(x), loaded(x))


def test_rng_state_roundtrip():
    import random

    import numpy as np

    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_a_model_started_from_a_local_vit_file_loads_and_converts_without_it(tmp_path):
    """The vision tower's weights travel in model.safetensors: loading (or converting) the export
    never reads `model.vision.checkpoint` again, which may be gone, or a pickle."""
    from safetensors.torch import save_file

    from fusion.convert import main as convert

    vit = [
        "model.vision.encoder=vit_tiny_patch16_224",
        "model.vision.img_size=32",
        "model.vision.patch_size=8",
        "model.dim=32",
    ]
    torch.manual_seed(0)
    model = build_model(load_config(None, vit).model, ByteTokenizer()).eval()
    weights = tmp_path / "vit.safetensors"  # as if the run had started from these ViT weights
    save_file({k: v.contiguous() for k, v in model.vision.encoder.model.state_dict().items()}, str(weights))
    cfg = load_config(None, vit + [f"model.vision.checkpoint={weights}"])
    export_model(model, cfg, tmp_path / "step_1")
    weights.unlink()
    loaded = fusion.load_model(tmp_path / "step_1")
    x = torch.randint(0, 256, (1, 6))
    assert torch.equal(model(x), loaded(x))
    assert convert(["to-hf", str(tmp_path / "step_1"), str(tmp_path / "hf")]) == 0
