"""fusion-convert against the Hugging Face Llama 4 implementation: logits match both ways in fp32,
every expert survives, bad input gets one clear error."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # a dev dependency: the reference implementation

import fusion
from fusion.checkpoint import export_model
from fusion.config import load_config
from fusion.convert import SafeTensorsDir, count_experts, main
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model

VOCAB = 300
SEQ = 40  # > 4 attention chunks of 8: chunking, NoPE layers and the temperature all act
CHUNK = 8

# Scout-like: MoE in every layer, QK norm, Llama 3 RoPE scaling (short original context so it bites)
SCOUT = dict(
    interleave_moe_layer_step=1,
    num_experts_per_tok=1,
    use_qk_norm=True,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
)
# Maverick-like: MoE every other layer, no QK norm, plain RoPE; top-2 and tied embeddings for coverage
MAVERICK = dict(
    interleave_moe_layer_step=2,
    num_experts_per_tok=2,
    use_qk_norm=False,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)


def hf_config(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        attention_chunk_size=CHUNK,
        no_rope_layer_interval=2,
        floor_scale=4,
        attn_scale=0.5,
        initializer_range=0.05,
    )
    return transformers.Llama4TextConfig(**{**base, **kw})


def hf_model(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(hf_config(**kw)).eval()
    model.save_pretrained(path)
    return model


def text_ids(B=2, T=SEQ, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)  # bytes only: no media placeholders


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", [SCOUT, MAVERICK], ids=["scout-like", "maverick-like"])
def test_from_hf_matches_hf_logits(tmp_path, variant):
    ref = hf_model(tmp_path / "hf", **variant)
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "fusion")]) == 0
    model = fusion.load_model(tmp_path / "fusion")
    ids = text_ids()
    with torch.no_grad():
        out = model(ids)
    assert isinstance(out, torch.Tensor) and out.shape == (2, SEQ, VOCAB)
    assert (out - hf_logits(ref, ids)).abs().max() < 1e-4
    cfg = model.cfg
    assert (
        cfg.attn_chunk == CHUNK
        and cfg.nope_every == 2
        and cfg.moe.every == variant["interleave_moe_layer_step"]
    )


def test_to_hf_loads_in_transformers_and_matches(tmp_path):
    """A model built here (random weights, every Llama 4 option on) -> HF directory -> from_pretrained."""
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "model.size=debug",
            "model.n_layers=4",
            "model.moe.every=2",
            "model.moe.top_k=2",
            "model.nope_every=4",
            f"model.attn_chunk={CHUNK}",
            "model.qk_norm=true",
            "model.floor_scale=4",
            "model.attn_scale=0.5",
            "model.rope_factor=4.0",
            "model.rope_original_ctx=16",
            "model.init_std=0.05",
        ],
    )
    model = build_model(cfg.model, ByteTokenizer()).eval()
    export_model(model, cfg, tmp_path / "ckpt")
    assert main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    ref = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = text_ids()
    with torch.no_grad():
        ours = model(ids)
    assert (ours - hf_logits(ref, ids)).abs().max() < 1e-4
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["no_rope_layers"] == [1, 1, 1, 0] and hf_cfg["moe_layers"] == [1, 3]
    assert hf_cfg["layer_types"] == ["chunked_attention"] * 3 + ["full_attention"]


def test_round_trip_keeps_every_expert_and_weight(tmp_path):
    hf_model(tmp_path / "hf", **SCOUT)
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "fusion")]) == 0
    assert main(["to-hf", str(tmp_path / "fusion"), str(tmp_path / "back")]) == 0
    a, f, b = (
        SafeTensorsDir(tmp_path / "hf"),
        SafeTensorsDir(tmp_path / "fusion"),
        SafeTensorsDir(tmp_path / "back"),
    )
    n_layers, n_experts = 4, 4  # MoE in every layer
    assert (
        count_experts(a, "hf") == count_experts(f, "fusion") == count_experts(b, "hf") == n_layers * n_experts
    )
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert torch.equal(a.get(key), b.get(key)), key


def test_sharded_checkpoint_and_conditional_generation_text(tmp_path):
    # shards listed in model.safetensors.index.json
    ref = hf_model(tmp_path / "unused", **MAVERICK)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert main(["from-hf", str(tmp_path / "sharded"), str(tmp_path / "f1")]) == 0
    ids = text_ids()
    with torch.no_grad():
        assert (fusion.load_model(tmp_path / "f1")(ids) - hf_logits(ref, ids)).abs().max() < 1e-4

    # the text part of an image-text Llama4ForConditionalGeneration checkpoint
    torch.manual_seed(0)
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vision_output_dim=32,
        image_size=28,
        patch_size=14,
        projector_input_dim=32,
        projector_output_dim=32,
    )
    full = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=hf_config(**SCOUT).to_dict(), vision_config=vision)
    ).eval()
    full.save_pretrained(tmp_path / "vlm")
    assert main(["from-hf", str(tmp_path / "vlm"), str(tmp_path / "f2")]) == 0
    with torch.no_grad():
        assert (
            fusion.load_model(tmp_path / "f2")(ids) - hf_logits(full.language_model, ids)
        ).abs().max() < 1e-4


def test_bad_inputs_get_one_clear_error(tmp_path, capsys):
    def error(argv):
        capsys.readouterr()  # drop what came before (transformers' progress bars)
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fusion-convert: error:")
        return lines[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in error(["from-hf", str(empty), str(tmp_path / "o")])

    hf_model(tmp_path / "hf", **SCOUT)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    assert "pickled weights are not read" in error(["from-hf", str(pickled), str(tmp_path / "o")])

    bad = json.loads((tmp_path / "hf" / "config.json").read_text())
    bad["attention_bias"] = True
    (pickled / "config.json").write_text(json.dumps(bad))
    assert "attention_bias" in error(["from-hf", str(pickled), str(tmp_path / "o")])

    # an existing output is never overwritten without --force
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert "--force" in error(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    capsys.readouterr()

    # what a Llama 4 checkpoint cannot hold is refused, naming the key
    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=debug", "model.moe.score=softmax"])
    export_model(build_model(cfg.model, ByteTokenizer()), cfg, tmp_path / "softmax")
    assert "model.moe.score" in error(["to-hf", str(tmp_path / "softmax"), str(tmp_path / "o2")])

    cfg = load_config(None, ["model.size=debug"])
    model = build_model(cfg.model, ByteTokenizer())
    model.moe_layers[0].router.expert_bias += torch.linspace(-1, 1, cfg.model.moe.n_experts)
    export_model(model, cfg, tmp_path / "biased")
    assert "--ignore-router-bias" in error(["to-hf", str(tmp_path / "biased"), str(tmp_path / "o3")])
    assert main(["to-hf", str(tmp_path / "biased"), str(tmp_path / "o3"), "--ignore-router-bias"]) == 0
    assert "dropping the routing bias" in capsys.readouterr().out


def test_to_hf_of_a_broken_model_dir_is_one_error_line(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=debug"])
    export_model(build_model(cfg.model, ByteTokenizer()), cfg, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    wider = {**meta, "model": {**meta["model"], "dim": 2 * meta["model"]["dim"]}}
    no_vocab = {k: v for k, v in meta.items() if k != "vocab_size"}
    for text, file, needle in (
        (json.dumps(meta)[:-20], "model.json", "not valid JSON"),
        ("[1, 2]", "model.json", "JSON object"),
        (json.dumps(no_vocab), "model.json", "'vocab_size'"),
        (json.dumps(wider), "model.safetensors", "wrong shape"),
    ):
        (tmp_path / "m" / "model.json").write_text(text)
        assert main(["to-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and file in lines[0] and needle in lines[0], lines
    assert not (tmp_path / "hf").exists()


def test_to_hf_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`fusion-convert ... | head` whose reader has gone: the files are written, no traceback."""
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=debug"])
    export_model(build_model(cfg.model, ByteTokenizer()), cfg, tmp_path / "m")
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "fusion.convert", "to-hf", str(tmp_path / "m"), str(tmp_path / "hf")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert r.stderr == "" and r.returncode == 141, r.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
