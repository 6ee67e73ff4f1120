"""Late fusion (model.fusion=late): closed gates at init give the text-only model, media reach only
their own sample's later tokens, it trains, and a run saves and reloads."""

from __future__ import annotations

import json

import pytest
import torch

import fusion
from fusion.config import load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model, media_slots
from tests.conftest import BIN, packed_batch, random_pixels, run_cli

TOK = ByteTokenizer()


def make(*overrides, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(
        None,
        [
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "model.fusion=late",
            "model.moe.path=loop",
            *overrides,
        ],
    )
    return cfg, build_model(cfg.model, TOK).eval()


def pixels(*shape, seed=0):
    return random_pixels(*shape, seed=seed)


def packed(samples, seq_len=200):
    return packed_batch(TOK, samples, seq_len)


def run(model, b, **kw):
    return model(
        b["input_ids"],
        positions=b["positions"],
        doc_ids=b["doc_ids"],
        images=b.get("images"),
        videos=b.get("videos"),
        **kw,
    )


def open_gates(model, value=1.0):
    with torch.no_grad():
        for block in model.late.blocks:
            block.attn_gate.fill_(value)
            block.ffn_gate.fill_(value)


def test_blocks_sit_before_every_kth_layer():
    _, model = make("model.n_layers=4", "model.xattn_every=2")
    assert model.late.layer_ids == [0, 2] and len(model.late.blocks) == 2
    assert all(b.attn_gate.item() == 0 and b.ffn_gate.item() == 0 for b in model.late.blocks)
    _, early = make("model.fusion=early")
    assert early.late is None


@pytest.mark.parametrize(
    "over", [[], ["model.xattn_every=2", "model.n_layers=3", "model.dense_baseline=true"]]
)
def test_plan_counts_the_cross_attention_blocks(over):
    from fusion.plan import count_parameters, count_parameters_of, make_plan

    cfg, model = make(*over)
    counted = count_parameters(cfg.model, model.vocab_size)
    assert counted == count_parameters_of(model) and counted["cross_attention"] > 0
    early_cfg, _ = make(*over, "model.fusion=early")
    late, early = make_plan(cfg), make_plan(early_cfg)
    assert late["params"]["total"]["total"] == early["params"]["total"]["total"] + counted["cross_attention"]
    assert late["flops_per_token"] > early["flops_per_token"]


@pytest.mark.parametrize("moe", ["moe", "dense"])
def test_closed_gates_give_the_text_only_model(moe):
    """At init the late model's logits at every text position equal the decoder's on the same row
    with the placeholders removed (positions renumbered), whatever the image."""
    _, model = make(*(["model.dense_baseline=true"] if moe == "dense" else []))
    b = packed([([" the colour is", ("image", 16), " red."], 1, {"images": [pixels(3, 32, 32)]})])
    ids = b["input_ids"]
    img, _ = media_slots(ids, model.special)
    with torch.no_grad():
        late = run(model, b)  # (1, T, V)
        other = run(model, {**b, "images": pixels(1, 3, 32, 32, seed=5)})
        text_ids = ids[~img][None]  # (1, Tt)
        keep = (b["doc_ids"][~img] >= 0)[None]
        ref, _, _ = model.decoder(
            model.decoder.tok_embeddings(text_ids), doc_ids=torch.where(keep, 0, -1), valid=keep
        )
    text = ~img[0] & (b["doc_ids"][0] >= 0)
    assert torch.allclose(late[0, text], ref[0, keep[0]], atol=1e-5)
    assert torch.equal(late, other)  # the image cannot matter yet
    assert late[0, img[0]].abs().max() == 0  # no prediction at placeholder positions


def test_media_reach_only_later_tokens_of_their_own_sample():
    """Two samples packed in a row: changing the second image changes only the second sample's
    tokens after that image; the first sample and the caption before the image are untouched."""
    _, model = make()
    open_gates(model)
    b = packed(
        [
            ([" a", ("image", 16), " red square."], 1, {"images": [pixels(3, 32, 32, seed=1)]}),
            ([" then", ("image", 16), " blue."], 1, {"images": [pixels(3, 32, 32, seed=2)]}),
        ]
    )
    assert int(b["doc_ids"].max()) == 1
    other = torch.stack([b["images"][0], pixels(3, 32, 32, seed=9)])
    with torch.no_grad():
        y0, y1 = run(model, b), run(model, {**b, "images": other})
    doc = b["doc_ids"][0]
    img, _ = media_slots(b["input_ids"], model.special)
    second_img_start = int(torch.nonzero(img[0] & (doc == 1))[0])
    changed = (y0[0] - y1[0]).abs().amax(-1) > 1e-6  # (T,)
    assert not changed[doc == 0].any()  # the first sample never sees the second image
    assert not changed[:second_img_start].any()  # nor does anything before it
    after = (doc == 1) & ~img[0] & (torch.arange(len(doc)) > second_img_start)
    assert changed[after].all()
    # and the first image reaches its own caption
    first = torch.stack([pixels(3, 32, 32, seed=7), b["images"][1]])
    with torch.no_grad():
        y2 = run(model, {**b, "images": first})
    assert ((y0[0] - y2[0]).abs().amax(-1) > 1e-6)[(doc == 0) & ~img[0]].any()


def test_video_and_text_only_batches_and_errors():
    _, model = make()
    open_gates(model)
    b = packed(
        [
            ([("video", 4, 16), " moves left."], 2, {"videos": [pixels(4, 3, 32, 32)]}),
            (["plain text only."], 0, {}),
        ]
    )
    with torch.no_grad():
        y = run(model, b)
    assert y.shape[:2] == b["input_ids"].shape and torch.isfinite(y).all()
    text = packed([(["just words here."], 0, {})])
    with torch.no_grad():
        assert torch.isfinite(run(model, text)).all()
    with pytest.raises(ValueError, match=r"64 video placeholder tokens .* but 0 video"):
        model(b["input_ids"])


def test_late_fusion_learns_from_the_image():
    """A caption that only the image tells: the gates open and the loss falls well below what
    the text alone allows (ln 2 for two equally likely colours)."""
    cfg, model = make("model.dense_baseline=true")
    model.train()
    colours = {"red": (230, 30, 30), "blue": (30, 30, 230)}
    samples = []
    for i in range(8):
        name = "red" if i % 2 else "blue"
        img = torch.tensor(colours[name], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32).clone()
        samples.append(([("image", 16), f" {name}"], 1, {"images": [img]}))
    b = packed(samples, seq_len=200)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):  # the zero-initialised gates need the steps to open (4 seeds checked)
        out = model(
            b["input_ids"],
            labels=b["labels"],
            positions=b["positions"],
            doc_ids=b["doc_ids"],
            images=b["images"],
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.lm_loss)
    assert float(out.lm_loss) < 0.5 * first
    assert any(abs(b.attn_gate.item()) > 1e-3 for b in model.late.blocks)
    # the colour token is predicted from the image: swap the images and the loss jumps
    with torch.no_grad():
        model.eval()
        right = model(
            b["input_ids"],
            labels=b["labels"],
            positions=b["positions"],
            doc_ids=b["doc_ids"],
            images=b["images"],
        ).lm_loss
        swapped = model(
            b["input_ids"],
            labels=b["labels"],
            positions=b["positions"],
            doc_ids=b["doc_ids"],
            images=b["images"].roll(1, 0),
        ).lm_loss
    assert swapped > right + 0.2


@pytest.mark.slow
def test_fusion_train_late_on_the_toy_world_and_reload(toy_world, tmp_path):
    """fusion-train with model.fusion=late on toy image + text shards: the loss falls, the
    checkpoint reloads with fusion.load_model and gives the logits of the trained model."""
    run_dir = tmp_path / "late"
    r = run_cli(
        [
            str(BIN / "fusion-train"),
            "--config",
            "configs/debug.yaml",
            "model.fusion=late",
            "model.xattn_every=1",
            f"data.text={toy_world / 'text'}",
            f"data.image={toy_world / 'vqa_image_train'}",
            "data.weights=[0.2,1.0,0.0]",
            "data.num_workers=0",
            "train.steps=12",
            "train.seq_len=96",
            "train.log_every=1",
            "train.lr=1e-2",
            "train.warmup=2",
            "model.moe.path=loop",
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            f"run.dir={run_dir}",
        ],
        env={"OMP_NUM_THREADS": "2"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = sum(x["loss"] for x in rows[:3]) / 3
    last = sum(x["loss"] for x in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    model = fusion.load_model(run_dir)
    assert model.late is not None
    assert any(abs(b.attn_gate.item()) > 0 for b in model.late.blocks)
