"""The fast paths on a CUDA GPU, in bf16, with the kernels `Kernels.for_device` chooses there
(`torch._grouped_mm` on sm90+, the shared expert on a side stream, compiled FlexAttention):

- MoE path "fast" against the fp32 loop reference (outputs and every gradient, with padding and
  zero-token experts, whose gradients are exactly zero) no worse than the bf16 loop path; the same
  with and without the side stream; the non-finite guard's sum across streams;
- no host sync in its forward and backward (`torch.cuda.set_sync_debug_mode("error")`);
- FlexAttention against the dense masks with gradients, in fp32 and in bf16;
- `train.compile` (inductor) on a Llama 4-style decoder against eager, with routing that has no
  ties by construction.

Skipped without CUDA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fusion.config import MoEConfig, load_config
from fusion.guard import NonFiniteGuard
from fusion.model.decoder import Decoder
from fusion.model.fusion import install_kernels
from fusion.model.kernels import Kernels
from fusion.model.moe import MoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"


def sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def moe_layer(path: str, dtype, side_stream: bool = True, **kw) -> MoE:
    """An MoE layer on the GPU with the device's kernels (with or without the side stream)."""
    cfg = dict(
        n_experts=8,
        top_k=2,
        n_shared=1,
        moe_ffn_dim=512,
        score="sigmoid",
        gate_on="input",
        balance="aux",
        z_coef=1e-3,
        path=path,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    moe = MoE(256, MoEConfig(**cfg))
    with torch.no_grad():  # experts 5 and 7 receive no token (x[..., 0] is set to 3 below)
        moe.router.gate.weight[[5, 7], 0] = -40.0
    moe = moe.to(device=DEV, dtype=dtype)
    choice = Kernels.for_device(DEV, dtype)
    install_kernels(moe, choice if side_stream else replace(choice, side_stream=False))
    return moe


def fwd_bwd(moe: MoE, x, valid, g):
    x = x.clone().requires_grad_(True)
    y, aux, z = moe(x, valid)
    torch.autograd.backward((y, aux + z), (g, torch.ones_like(aux)))
    return [y.float(), x.grad.float()] + [p.grad.float() for p in moe.parameters()]


def moe_inputs(B=4, T=512, D=256):
    torch.manual_seed(1)
    x = torch.randn(B, T, D, device=DEV)
    x[..., 0] = 3.0
    valid = torch.rand(B, T, device=DEV) > 0.1
    g = torch.randn(B, T, D, device=DEV)
    return x, valid, g


@pytest.mark.parametrize("gate_on,k", [("input", 1), ("output", 2), ("input", 4)])
def test_fast_bf16_matches_fp32_reference_with_grads(gate_on, k, monkeypatch):
    x, valid, g = moe_inputs()
    ref = fwd_bwd(moe_layer("loop", torch.float32, gate_on=gate_on, top_k=k), x, valid, g)
    loop16 = fwd_bwd(
        moe_layer("loop", torch.bfloat16, gate_on=gate_on, top_k=k), x.bfloat16(), valid, g.bfloat16()
    )
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast16 = fwd_bwd(
        moe_layer("fast", torch.bfloat16, gate_on=gate_on, top_k=k), x.bfloat16(), valid, g.bfloat16()
    )
    if Kernels.for_device(DEV, torch.bfloat16).grouped_mm:
        assert len(calls) == 3  # the fast result came from the grouped GEMMs, not the fallback loop
    names = ["y", "x.grad"] + [n for n, _ in moe_layer("loop", torch.float32).named_parameters()]
    assert names[3:6] == ["experts.w1", "experts.w3", "experts.w2"]
    for name, r, a, b in zip(names, ref, loop16, fast16):
        scale = r.abs().max().clamp(min=1e-6)
        err_loop, err_fast = (a - r).abs().max() / scale, (b - r).abs().max() / scale
        assert torch.isfinite(b).all(), name
        assert err_fast <= 2 * err_loop + 1e-2, (name, float(err_fast), float(err_loop))
    for result in (ref, loop16, fast16):  # the routed experts' grads: 5 and 7 got no token
        for w in result[3:6]:
            assert (w[[5, 7]] == 0).all()
            assert (w[[0, 1, 2, 3, 4, 6]] != 0).any()


def test_side_stream_changes_nothing_and_the_guard_sums_across_streams():
    """The shared expert on the side stream (forward and backward) gives what the same layer gives
    on one stream; the guard, given the streams, sums every gradient's squared norm."""
    x, valid, g = moe_inputs()
    one = moe_layer("fast", torch.bfloat16, side_stream=False)
    two = moe_layer("fast", torch.bfloat16)
    assert one.streams is None and two.streams is not None
    guard = NonFiniteGuard(two, [], torch.device(DEV), streams=two.streams)
    a = fwd_bwd(one, x.bfloat16(), valid, g.bfloat16())
    b = fwd_bwd(two, x.bfloat16(), valid, g.bfloat16())
    torch.cuda.synchronize()
    for r, s in zip(a, b):
        torch.testing.assert_close(s, r, rtol=1.6e-2, atol=1e-2 * float(r.abs().max().clamp(min=1e-6)))
    expected = sum(p.grad.float().square().sum() for p in two.parameters())
    torch.testing.assert_close(guard.grad_sq, expected, rtol=1e-3, atol=0)


@pytest.mark.skipif(
    not sm90(),
    reason="torch._grouped_mm needs sm90+ (elsewhere fast falls back to a "
    "per-expert loop, which reads the group offsets on the host)",
)
def test_fast_forward_and_backward_have_no_host_sync():
    moe = moe_layer("fast", torch.bfloat16).train()
    torch.manual_seed(3)
    x = torch.randn(2, 256, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    valid = torch.rand(2, 256, device=DEV) > 0.2
    g = torch.randn(2, 256, 256, device=DEV, dtype=torch.bfloat16)

    def step():
        y, aux, z = moe(x, valid)
        torch.autograd.backward((y, aux + z), (g, torch.ones_like(aux)))
        return y

    step()  # warm-up: lazy initialisation (cuBLAS handles, the side stream) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters())


# ---------------------------------------------------------------------------------------------
# attention and the whole decoder
# ---------------------------------------------------------------------------------------------


def packed(dim: int, dtype):
    B, T = 2, 512
    doc = torch.cat([torch.zeros(B, 200), torch.ones(B, 250), torch.full((B, 62), 2.0)], 1).long()
    doc[1, 400:] = -1  # padding
    pos = torch.stack([torch.cat([torch.arange(200), torch.arange(250), torch.arange(62)])] * B)
    pos[1, 400:] = 0
    torch.manual_seed(2)
    h = torch.randn(B, T, dim, dtype=dtype)
    return h.to(DEV), pos.to(DEV), doc.to(DEV), (doc >= 0).to(DEV)


def llama4_decoder(*overrides, dtype=torch.float32):
    """The same weights on every call (seed 0), on the GPU in `dtype`, with the device's kernels."""
    cfg = load_config(
        None,
        [
            "model.dim=256",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.n_layers=4",
            "model.nope_every=2",
            "model.attn_chunk=128",
            "model.qk_norm=true",
            "model.floor_scale=64",
            "model.moe.every=2",
            "model.moe.path=fast",
            *overrides,
        ],
    ).model
    torch.manual_seed(0)
    dec = Decoder(cfg, 128).to(device=DEV, dtype=dtype)
    install_kernels(dec, Kernels.for_device(DEV, dtype))
    return dec


def run_decoder(dec, h, pos, doc, valid, g):
    x = h.clone().requires_grad_(True)
    logits, aux, z = dec(x, pos, doc, valid)
    ((logits.float() * g).sum() + aux + z).backward()
    return [logits.float(), x.grad.float()] + [p.grad.float() for p in dec.parameters() if p.grad is not None]


def test_flex_attention_matches_dense_masks_with_grads():
    dense = llama4_decoder()
    flex = llama4_decoder("model.attn_impl=flex")
    h, pos, doc, valid = packed(256, torch.float32)
    g = torch.randn(*h.shape[:2], 128, device=DEV)
    for a, b in zip(run_decoder(dense, h, pos, doc, valid, g), run_decoder(flex, h, pos, doc, valid, g)):
        assert (b - a).abs().max() <= 1e-3 * a.abs().max().clamp(min=1e-6)


@pytest.mark.parametrize(
    "layer", [0, 1]
)  # 0: RoPE, chunked mask, QK norm; 1: NoPE, document mask, temperature
def test_flex_attention_matches_sdpa_in_bf16_with_grads(layer):
    """One attention layer in bf16: compiled FlexAttention with block masks against SDPA with the
    dense masks, both against the fp32 SDPA reference (outputs, input and weight gradients): flex
    is no worse than SDPA's own bf16 error, up to 2% of the largest value."""
    dense = llama4_decoder()
    flex = llama4_decoder("model.attn_impl=flex")
    assert flex.kernels.compile_flex
    _, pos, doc, _ = packed(256, torch.float32)
    block = dense.layers[layer]
    assert block.chunked == (layer == 0) and block.use_rope == (layer == 0)
    full, chunk, q_scale = dense.attention_inputs(pos, doc)
    flex_full, flex_chunk, _ = flex.attention_inputs(pos, doc)
    mask, flex_mask = (chunk, flex_chunk) if block.chunked else (full, flex_full)
    assert isinstance(mask, torch.Tensor) and not isinstance(flex_mask, torch.Tensor)
    cos, sin = dense.rotary(pos)
    torch.manual_seed(4)
    x = torch.randn(2, 512, 256, device=DEV)
    g = torch.randn(2, 512, 256, device=DEV)

    def run(attn, m, dtype):
        attn = attn.to(dtype)
        attn.zero_grad(set_to_none=True)
        xi = x.to(dtype).clone().requires_grad_(True)
        y = attn(xi, cos, sin, m, q_scale)
        (y.float() * g).sum().backward()
        return [y.float(), xi.grad.float()] + [p.grad.float() for p in attn.parameters()]

    ref = run(dense.layers[layer].attn, mask, torch.float32)
    sdpa16 = run(dense.layers[layer].attn, mask, torch.bfloat16)
    flex16 = run(flex.layers[layer].attn, flex_mask, torch.bfloat16)
    for i, (r, a, b) in enumerate(zip(ref, sdpa16, flex16)):
        scale = r.abs().max().clamp(min=1e-6)
        err_sdpa, err_flex = (a - r).abs().max() / scale, (b - r).abs().max() / scale
        assert torch.isfinite(b).all(), i
        assert err_flex <= max(2 * err_sdpa, 2e-2), (i, float(err_flex), float(err_sdpa))


def test_train_compile_with_inductor_matches_eager():
    """Routing without ties by construction: every router's bias (which chooses, and never enters
    the gate value) puts experts 0 and 1 far above the others, so each token's top-2 set is {0, 1}
    in eager and compiled code alike, whatever rounding does to the logits; experts 2-7 get no token.
    The gate values, and everything else, still depend on the computation compared."""
    overrides = (
        "model.attn_impl=flex",
        "model.moe.n_experts=8",
        "model.moe.top_k=2",
        "model.moe.balance=bias",
    )
    eager = llama4_decoder(*overrides, dtype=torch.bfloat16)
    compiled = llama4_decoder(*overrides, dtype=torch.bfloat16)
    for dec in (eager, compiled):
        for moe in dec.moe_layers:
            moe.router.expert_bias.copy_(torch.tensor([30.0, 30.0] + [-30.0] * 6))
    compiled.compile_blocks()
    h, pos, doc, valid = packed(256, torch.bfloat16)
    g = torch.randn(*h.shape[:2], 128, device=DEV)
    a_all, b_all = run_decoder(eager, h, pos, doc, valid, g), run_decoder(compiled, h, pos, doc, valid, g)
    assert len(a_all) == len(b_all)
    for a, b in zip(a_all, b_all):
        scale = a.abs().max().clamp(min=1e-6)
        assert (b - a).abs().max() / scale < 5e-2
    for dec in (eager, compiled):
        for moe in dec.moe_layers:
            for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
                assert (w.grad[2:] == 0).all() and (w.grad[:2] != 0).any()
