"""The vision path: patch tokens only, pixel-shuffle, tower shapes and token counts, frame order,
freezing, local checkpoints, empty batches. Tiny models only; nothing is downloaded."""

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from fusion.config import VisionConfig
from fusion.model.vision import (
    ConvStem,
    PatchLinear,
    Projector,
    TimmEncoder,
    VisionTower,
    conv_stem_channels,
    load_encoder_weights,
    pixel_shuffle,
    pixel_unshuffle,
)

VIT = "vit_tiny_patch16_224"  # built at img_size 32, patch_size 8: a 4x4 grid, width 192
DIM = 32
DEFAULTS = dict(
    encoder="patch-linear",
    img_size=32,
    patch_size=8,
    width=0,
    pixel_shuffle=False,
    temporal_merge=1,
    max_frames=32,
    frame_pos=True,
    checkpoint="",
    freeze=False,
    mean=[0.5, 0.5, 0.5],
    std=[0.5, 0.5, 0.5],
)


def vcfg(**kw):
    """A VisionConfig-like object: the real dataclass's defaults where it has the field."""
    return types.SimpleNamespace(**{**DEFAULTS, **dataclasses.asdict(VisionConfig()), **kw})


def tower(seed=0, dim=DIM, **kw) -> VisionTower:
    torch.manual_seed(seed)
    return VisionTower(vcfg(**kw), dim).eval()


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def videos(m, f, seed=0):
    return torch.randn(m, f, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_tower() -> VisionTower:
    return tower(encoder=VIT)


# ---- encoders -------------------------------------------------------------------------------


def test_timm_encoder_returns_patch_tokens_only(vit_tower):
    enc = vit_tower.encoder
    x = images(2)
    out = enc(x)
    assert enc.num_prefix_tokens == 1 and enc.n_patches == (32 // 8) ** 2
    assert out.shape == (2, 16, 192)
    full = enc.model.forward_features(x)
    assert full.shape == (2, 17, 192)
    torch.testing.assert_close(out, full[:, 1:], rtol=0, atol=0)


def test_timm_encoder_rejects_non_vit_and_unknown_names():
    with pytest.raises(ValueError, match="test_resnet.*ViT-style"):
        TimmEncoder("test_resnet", 32, 8)
    with pytest.raises(ValueError, match="no_such_vit"):
        TimmEncoder("no_such_vit", 32, 8)


def test_patch_linear_is_a_strided_conv_plus_position():
    torch.manual_seed(0)
    enc = PatchLinear(img_size=32, patch_size=8, width=24)
    x = images(2)
    conv = F.conv2d(x, enc.proj.weight.view(24, 3, 8, 8), enc.proj.bias, stride=8)  # (N, 24, 4, 4)
    expected = conv.flatten(2).transpose(1, 2) + enc.pos_embed  # (N, 16, 24)
    out = enc(x)
    assert out.shape == (2, 16, 24)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_conv_stem_tokens_see_across_patch_borders():
    """One token per patch_size x patch_size cell, like patch-linear, but a token also sees the
    pixels just across its cell's border (a small shape cut by the border lands whole in one token's
    view), while a far corner stays out of a token's receptive field."""
    torch.manual_seed(0)
    enc = ConvStem(img_size=32, patch_size=8, width=24)
    assert [m.stride[0] for m in enc.convs if isinstance(m, torch.nn.Conv2d)] == [1, 2, 2, 2]
    x = images(1)
    out = enc(x)
    assert out.shape == (1, 16, 24) and (enc.grid, enc.n_patches, enc.width) == (4, 16, 24)
    y = x.clone()
    y[..., 8, 8] += 1.0  # the first pixel of cell (1, 1): token 0's cell ends one pixel before it
    changed = (enc(y) - out).abs().amax(-1)[0].view(4, 4)
    assert changed[0, 0] > 0 and changed[1, 1] > 0
    assert changed[3, 3] == 0  # 24+ pixels away
    torch.testing.assert_close(enc(x) - enc.pos_embed, enc.convs(x).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("encoder", ["patch-linear", "conv-stem"])
def test_image_embeddings_start_at_the_token_embedding_scale(encoder):
    """At init an image embedding is about as large as a token embedding (std init_std): within 4x
    either way on noise pixels (the PyTorch default init left it an order of magnitude smaller)."""
    for init_std in (0.02, 0.088):
        torch.manual_seed(0)
        t = VisionTower(vcfg(encoder=encoder), 128, init_std)
        rms = t.encode_images(images(8)).pow(2).mean().sqrt().item()
        assert init_std / 4 < rms < init_std * 4, (init_std, rms)


def test_conv_stem_channels_and_bad_patch_sizes():
    assert conv_stem_channels(8, 128) == [16, 32, 64, 128]
    assert conv_stem_channels(2, 64) == [32, 64]
    assert conv_stem_channels(16, 32) == [16, 32, 32, 32, 32]
    assert conv_stem_channels(4, 256) == [64, 128, 256]
    for bad in (1, 6, 12):
        with pytest.raises(ValueError, match=f"conv-stem.*power of 2.*got {bad}"):
            tower(encoder="conv-stem", img_size=24 if bad != 1 else 32, patch_size=bad)


def test_patch_linear_width_defaults_to_decoder_dim():
    assert tower(width=0).encoder.width == DIM
    assert tower(width=12).encoder.width == 12


def test_projector_is_bias_free_mlp_to_decoder_dim():
    proj = Projector(20, 16, 8)
    assert all(m.bias is None for m in (proj.fc1, proj.fc2, proj.proj))
    assert proj(torch.randn(3, 5, 20)).shape == (3, 5, 8)


# ---- pixel shuffle --------------------------------------------------------------------------


def test_pixel_shuffle_shape_layout_and_inverse():
    x = torch.randn(2, 16, 6)  # a 4x4 grid
    y = pixel_shuffle(x)
    assert y.shape == (2, 4, 24)  # 4x fewer tokens, 4x channels
    grid = x.view(2, 4, 4, 6)
    # coarse token (1, 0) holds fine patches (2,0), (2,1), (3,0), (3,1) in that order
    expected = torch.cat([grid[:, 2, 0], grid[:, 2, 1], grid[:, 3, 0], grid[:, 3, 1]], dim=-1)
    torch.testing.assert_close(y[:, 1 * 2 + 0], expected, rtol=0, atol=0)
    torch.testing.assert_close(pixel_unshuffle(y), x, rtol=0, atol=0)
    z = torch.randn(3, 4, 24)
    torch.testing.assert_close(pixel_shuffle(pixel_unshuffle(z)), z, rtol=0, atol=0)


def test_pixel_shuffle_rejects_odd_or_non_square_grids():
    with pytest.raises(ValueError, match="side 3 is not divisible by 2"):
        pixel_shuffle(torch.randn(1, 9, 4))
    with pytest.raises(ValueError, match="square"):
        pixel_shuffle(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="even patch grid.*3 patches per side"):
        tower(img_size=24, patch_size=8, pixel_shuffle=True)


# ---- tower shapes and token counts ----------------------------------------------------------


@pytest.mark.parametrize(
    "encoder, shuffle, merge",
    [
        ("patch-linear", False, 1),
        ("patch-linear", True, 1),
        ("patch-linear", False, 2),
        ("patch-linear", True, 2),
        ("conv-stem", False, 1),
        ("conv-stem", True, 2),
        (VIT, False, 1),
        (VIT, True, 2),
    ],
)
def test_tower_shapes_match_token_counts(encoder, shuffle, merge):
    t = tower(encoder=encoder, pixel_shuffle=shuffle, temporal_merge=merge)
    tpi = 4 if shuffle else 16
    assert t.tokens_per_image == t.tokens_per_frame_group == tpi
    img = t.encode_images(images(3))
    assert img.shape == (3, tpi, DIM)
    vid = t.encode_videos(videos(2, 4))
    assert vid.shape == (2, 4 // merge, tpi, DIM)
    assert t.video_tokens(4) == vid[0].numel() // DIM == (4 // merge) * tpi


def test_temporal_merge_needs_divisible_frames():
    t = tower(temporal_merge=2)
    with pytest.raises(ValueError, match="3 frames.*temporal_merge 2"):
        t.video_tokens(3)
    with pytest.raises(ValueError, match="3 frames.*temporal_merge 2"):
        t.encode_videos(videos(1, 3))


def test_too_many_frames_for_the_position_table():
    t = tower(max_frames=4, temporal_merge=2)
    assert t.frame_pos.shape == (2, DIM)
    with pytest.raises(ValueError, match="6 frames make 3 frame groups.*has 2"):
        t.encode_videos(videos(1, 6))


def test_wrong_image_size_raises():
    with pytest.raises(ValueError, match=r"\(48, 48\).*32x32"):
        tower().encode_images(torch.randn(1, 3, 48, 48))


def test_image_is_k_identical_frames():
    t = tower(temporal_merge=2, frame_pos=False, pixel_shuffle=True)
    x = images(2)
    as_video = t.encode_videos(x[:, None].expand(2, 2, 3, 32, 32))  # (2, 1, T, D)
    torch.testing.assert_close(t.encode_images(x), as_video[:, 0])


def test_videos_in_one_batch_equal_videos_alone(vit_tower):
    v = videos(2, 3)
    both = vit_tower.encode_videos(v)
    for i in range(2):
        torch.testing.assert_close(
            both[i : i + 1], vit_tower.encode_videos(v[i : i + 1]), rtol=1e-5, atol=1e-5
        )


# ---- frame order ----------------------------------------------------------------------------


def test_frame_order_is_visible_with_frame_pos():
    v = videos(1, 4)
    plain = tower(frame_pos=False)
    # without positions (and k=1) the tower is equivariant to frame order: order is invisible
    torch.testing.assert_close(plain.encode_videos(v.flip(1)), plain.encode_videos(v).flip(1))
    t = tower(frame_pos=True)
    assert not torch.allclose(t.encode_videos(v.flip(1)), t.encode_videos(v).flip(1), atol=1e-4)


def test_order_within_a_merged_group_matters():
    t = tower(frame_pos=False, temporal_merge=2)
    v = videos(1, 4)
    out, rev = t.encode_videos(v), t.encode_videos(v.flip(1))  # groups (0,1),(2,3) vs (3,2),(1,0)
    assert out.shape == rev.shape == (1, 2, 16, DIM)
    assert not torch.allclose(rev.flip(1), out, atol=1e-4)


# ---- freezing -------------------------------------------------------------------------------


def test_frozen_encoder_gets_no_grads_projector_does():
    t = tower(encoder=VIT, freeze=True, pixel_shuffle=True, temporal_merge=2).train()
    assert t.training and t.projector.training and not t.encoder.model.training
    assert all(not p.requires_grad for p in t.encoder.parameters())
    loss = t.encode_images(images(2)).square().mean() + t.encode_videos(videos(1, 2)).mean()
    loss.backward()
    assert all(p.grad is None for p in t.encoder.parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in [*t.projector.parameters(), t.frame_pos]
    )


def test_unfrozen_encoder_trains():
    t = tower(encoder="patch-linear").train()
    t.encode_images(images(2)).square().mean().backward()
    assert all(p.grad is not None for p in t.encoder.parameters())


@pytest.mark.parametrize("encoder", ["patch-linear", "conv-stem"])
def test_own_encoders_reject_checkpoint_and_freeze(encoder):
    with pytest.raises(ValueError, match=f"{encoder}.*no checkpoint"):
        tower(encoder=encoder, checkpoint="x.pt")
    with pytest.raises(ValueError, match="freeze"):
        tower(encoder=encoder, freeze=True)


# ---- local checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(vit_tower, tmp_path, suffix):
    state = dict(vit_tower.encoder.model.state_dict())
    # a classifier checkpoint's head has no place in the headless encoder and is skipped
    state["head.weight"], state["head.bias"] = torch.randn(10, 192), torch.randn(10)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    x = images(2)
    fresh = tower(seed=1, encoder=VIT)
    assert not torch.allclose(fresh.encoder(x), vit_tower.encoder(x))
    loaded = tower(seed=1, encoder=VIT, checkpoint=str(path))
    torch.testing.assert_close(loaded.encoder(x), vit_tower.encoder(x), rtol=0, atol=0)


def test_checkpoint_from_another_image_size_is_resampled(vit_tower, tmp_path):
    # timm's own checkpoint filter resamples the position table (a 4x4 grid into 8x8 here)
    path = tmp_path / "vit32.pt"
    torch.save(vit_tower.encoder.model.state_dict(), path)
    enc = TimmEncoder(VIT, 64, 8, checkpoint=str(path))
    torch.testing.assert_close(
        enc.model.blocks[0].attn.qkv.weight, vit_tower.encoder.model.blocks[0].attn.qkv.weight, rtol=0, atol=0
    )
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 64, 192)


@pytest.fixture(scope="module")
def scratch_vit():
    """A model for failed loads (a failed load may have copied some tensors into it)."""
    return TimmEncoder(VIT, 32, 8).model


def test_bad_checkpoints_name_the_file(scratch_vit, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_encoder_weights(scratch_vit, str(garbage))

    other = tmp_path / "patch_linear.pt"
    torch.save(PatchLinear(32, 8, 16).state_dict(), other)
    with pytest.raises(ValueError, match="patch_linear.pt does not fit"):
        load_encoder_weights(scratch_vit, str(other))

    partial = tmp_path / "partial.safetensors"
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in scratch_vit.state_dict().items() if "blocks.11" not in k}
    save_file(state, str(partial))
    with pytest.raises(ValueError, match=r"partial.safetensors.*missing keys \['blocks.11"):
        load_encoder_weights(scratch_vit, str(partial))

    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        tower(encoder=VIT, checkpoint=str(tmp_path / "nowhere.pt"))


# ---- empty batches --------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [1, 2])
def test_empty_batches_skip_the_encoder(merge):
    t = tower(pixel_shuffle=True, temporal_merge=merge)
    calls = []
    t.encoder.register_forward_hook(lambda *a: calls.append(1))
    assert t.encode_images(torch.zeros(0, 3, 32, 32)).shape == (0, 4, DIM)
    assert t.encode_videos(torch.zeros(0, 4, 3, 32, 32)).shape == (0, 4 // merge, 4, DIM)
    assert calls == []
