"""Early fusion: placeholders, splicing, per-modality losses, frame order."""

from __future__ import annotations

import pytest
import torch

from fusion.config import ConfigError, load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model, media_slots
from fusion.schema import tokens_per_image, tokens_per_video
from tests.conftest import packed_batch, random_pixels

TOK = ByteTokenizer()


def make(*overrides):
    torch.manual_seed(0)
    cfg = load_config(
        None, ["model.vision.img_size=32", "model.vision.patch_size=8", "model.moe.path=loop", *overrides]
    )
    model = build_model(cfg.model, TOK)
    model.eval()
    return cfg, model


def pixels(*shape, seed=0):
    return random_pixels(*shape, seed=seed)


def packed(samples, seq_len=160):
    return packed_batch(TOK, samples, seq_len)


def run(model, b, **kw):
    return model(
        b["input_ids"],
        labels=b["labels"],
        positions=b["positions"],
        doc_ids=b["doc_ids"],
        sample_modality=b["sample_modality"],
        images=b.get("images"),
        videos=b.get("videos"),
        **kw,
    )


def test_token_budget_helpers_agree_with_the_tower():
    for over in ([], ["model.vision.pixel_shuffle=true"], ["model.vision.temporal_merge=2"]):
        cfg, model = make(*over)
        assert tokens_per_image(cfg.model.vision) == model.vision.tokens_per_image
        groups = 8 // cfg.model.vision.temporal_merge
        assert tokens_per_video(cfg.model.vision, 8) == model.vision.video_tokens(8) + groups - 1 + 2


def test_placeholder_mismatch_raises_with_both_counts():
    _, model = make()
    b = packed([([("image", 16), " a cat"], 1, {"images": [pixels(3, 32, 32)]})])
    with pytest.raises(ValueError, match=r"16 image placeholder tokens .* but 32 image embeddings"):
        model(b["input_ids"], images=torch.cat([b["images"], b["images"]]))
    with pytest.raises(ValueError, match=r"16 image placeholder tokens .* but 0 image"):
        model(b["input_ids"])


def test_spliced_embeddings_equal_the_projected_vision_output():
    _, model = make()
    imgs = [pixels(3, 32, 32, seed=1), pixels(3, 32, 32, seed=2)]
    vid = pixels(8, 3, 32, 32, seed=3)
    b = packed(
        [
            ([("image", 16), " one", ("image", 16), " two"], 1, {"images": imgs}),
            ([("video", 8, 16), " moves"], 2, {"videos": [vid]}),
        ],
        seq_len=200,
    )
    h, token_modality = model.embed(b["input_ids"], b["images"], b["videos"])
    img_slots, vid_slots = media_slots(b["input_ids"], model.special)
    direct_img = model.vision.encode_images(model.normalize(torch.stack(imgs)))  # (2, 16, D)
    direct_vid = model.vision.encode_videos(model.normalize(vid[None]))  # (1, 8, 16, D)
    assert torch.allclose(h[img_slots], direct_img.flatten(0, 1), atol=1e-6)
    assert torch.allclose(h[vid_slots], direct_vid.flatten(0, 2), atol=1e-6)
    text = ~(img_slots | vid_slots)
    assert torch.equal(h[text], model.decoder.tok_embeddings(b["input_ids"])[text])
    assert torch.equal(token_modality[img_slots], torch.ones(32, dtype=torch.long))
    assert (token_modality[vid_slots] == 2).all() and (token_modality[text] == 0).all()


def test_video_frame_order_changes_the_output():
    _, model = make()
    vid = pixels(8, 3, 32, 32, seed=4)
    b = packed([([("video", 8, 16), " moves"], 2, {"videos": [vid]})], seq_len=160)
    fwd = model(b["input_ids"], positions=b["positions"], doc_ids=b["doc_ids"], videos=vid[None])
    rev = model(b["input_ids"], positions=b["positions"], doc_ids=b["doc_ids"], videos=vid.flip(0)[None])
    assert not torch.allclose(fwd, rev, atol=1e-4)


def test_losses_per_modality_and_no_loss_on_media_tokens():
    _, model = make()
    b = packed(
        [
            (["plain text here"], 0, {}),
            ([("image", 16), " a red square"], 1, {"images": [pixels(3, 32, 32)]}),
        ],
        seq_len=80,
    )
    out = run(model, b)
    labels, ids = b["labels"], b["input_ids"]
    assert (labels[ids == TOK.patch_id] == -100).all()
    special = torch.tensor([TOK.image_start_id, TOK.image_end_id, TOK.patch_id])
    assert not torch.isin(labels, special).any()  # no target is a placeholder or marker
    n_text = len(TOK.encode("plain text here")) + 1  # + eos
    n_image = len(TOK.encode(" a red square")) + 1  # caption after the image + eos
    assert out.loss_count.tolist() == [n_text, n_image, 0]


def test_loss_average_weights_documents_as_named():
    """`train.loss_average`: a packed row of a 16-token text and a 14-token caption. "token" is
    the plain mean over the 30 tokens, "sample" the mean of the two documents' means, "square"
    weights each token by 1/sqrt of its document's count; the logged per-modality sums stay
    per token."""
    _, model = make()
    b = packed(
        [
            (["plain text here"], 0, {}),
            ([("image", 16), " a red square"], 1, {"images": [pixels(3, 32, 32)]}),
        ],
        seq_len=80,
    )
    assert b["doc_ids"].shape[0] == 1  # both documents in one row
    got = {}
    for how in ("token", "sample", "square"):
        model.loss_average = how
        with torch.no_grad():
            out = run(model, b)
        got[how] = out.lm_loss.item()
        sums, counts = out.loss_sum[:2].double(), out.loss_count[:2].double()
    assert counts.tolist() == [16, 14]
    assert got["token"] == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5)
    assert got["sample"] == pytest.approx((sums / counts).mean().item(), rel=1e-5)
    w = counts.rsqrt()
    assert got["square"] == pytest.approx(((sums * w).sum() / (counts * w).sum()).item(), rel=1e-5)
    assert abs(got["sample"] - got["token"]) > 1e-4  # the documents' means differ
    with pytest.raises(ConfigError, match="train.loss_average.*'mean' is not one of token, sample, square"):
        load_config(None, ["train.loss_average=mean"])


def test_training_mode_gives_every_vision_parameter_a_gradient_without_media():
    _, model = make()
    model.train()
    b = packed([(["only text, no media at all"], 0, {})], seq_len=32)
    run(model, b).loss.backward()
    assert all(p.grad is not None for p in model.vision.parameters())


# ---- learning rates ---------------------------------------------------------------------------


def test_the_encoder_learns_at_its_own_rate_only_when_asked():
    """`model.vision.lr_scale` covers the whole tower; `encoder_lr_scale` gives the encoder's
    weights a rate of their own while the projector keeps the tower's. Unset, the optimizer's
    groups are those of a tower at one rate (older optimizer states still load)."""
    from fusion.config import VisionConfig
    from fusion.step import param_groups

    _, model = make("model.vision.encoder=conv-stem")
    model.train()
    one_rate = param_groups(model, 0.1, VisionConfig(lr_scale=2.0))
    assert {g["name"]: g["lr_scale"] for g in one_rate if g["name"].startswith("vision")} == {
        "vision_decay": 2.0,
        "vision_no_decay": 2.0,
    }
    groups = {
        g["name"]: g for g in param_groups(model, 0.1, VisionConfig(lr_scale=2.0, encoder_lr_scale=3.0))
    }
    owner = {id(p): name for name, p in model.named_parameters()}

    def names(group):
        return sorted(owner[id(p)] for p in groups[group]["params"])

    encoder = sorted(n for n, _ in model.named_parameters() if n.startswith("vision.encoder."))
    assert sorted(names("vision_encoder_decay") + names("vision_encoder_no_decay")) == encoder
    assert "vision.encoder.pos_embed" in names("vision_encoder_no_decay")  # positions never decay
    assert groups["vision_encoder_decay"]["lr_scale"] == groups["vision_encoder_no_decay"]["lr_scale"] == 3.0
    assert (
        "vision.projector.fc1.weight" in names("vision_decay") and groups["vision_decay"]["lr_scale"] == 2.0
    )
    assert groups["decay"]["lr_scale"] == 1.0
    # every trainable parameter is in exactly one group, as without the split
    assert sorted(n for g in groups for n in names(g)) == sorted(n for n, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in one_rate) == len(owner)

    # a first AdamW step moves a weight by about its group's rate (no decay: lr * m / sqrt(v) = lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(
        [{**g, "lr": 1e-3 * g["lr_scale"], "weight_decay": 0.0} for g in groups.values()], lr=1e-3
    )
    b = packed([([("image", 16), " a red circle"], 1, {"images": [pixels(3, 32, 32)]})])
    run(model, b).loss.backward()
    opt.step()
    params = dict(model.named_parameters())

    def moved(name):
        return (params[name] - before[name]).abs().max().item()

    assert moved("vision.encoder.convs.0.weight") == pytest.approx(3e-3, rel=0.01)
    assert moved("vision.projector.fc1.weight") == pytest.approx(2e-3, rel=0.01)
    assert moved("decoder.layers.0.attn.wq.weight") == pytest.approx(1e-3, rel=0.01)
