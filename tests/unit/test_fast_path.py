"""The fast paths on CPU: `model.moe.path=fast` equals the reference loop (outputs,
losses, load counts, every gradient) with padding, skewed routing and zero-token experts; its
aligned layout; FlexAttention block masks equal the dense masks (forward: PyTorch has no
FlexAttention backward on CPU; tests/gpu checks gradients); `train.compile` traces whole blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fusion.config import ConfigError, MoEConfig, load_config
from fusion.model.decoder import Decoder
from fusion.model.moe import MoE
from fusion.model.moe.fast import ALIGN, buffer_rows, layout_pairs, run_sorted, swiglu

D, H = 8, 16  # fp32 rows of 32 and 64 bytes: what _grouped_mm accepts


def make_pair(seed: int = 0, **kw) -> tuple[MoE, MoE]:
    """The same layer twice: path "loop" (the reference) and path "fast"."""
    cfg = dict(
        n_experts=4,
        top_k=1,
        n_shared=1,
        moe_ffn_dim=H,
        score="sigmoid",
        gate_on="input",
        balance="aux",
        z_coef=1e-3,
        path="loop",
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    ref = MoE(D, MoEConfig(**cfg), init_std=0.3)
    fast = MoE(D, MoEConfig(**{**cfg, "path": "fast"}))  # the path is chosen when the layer is built
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def run(moe: MoE, x: torch.Tensor, valid, modality, grad_out: torch.Tensor):
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    y, aux, z = moe(x, valid, modality)
    ((y * grad_out).sum() + aux + z).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return y.detach(), aux.detach(), z.detach(), x.grad, grads, moe.take_load()


def assert_same(ref_out, fast_out, atol=1e-5):
    for a, b in zip(ref_out[:4], fast_out[:4]):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-5)
    for name, g in ref_out[4].items():
        torch.testing.assert_close(fast_out[4][name], g, atol=atol, rtol=1e-5, msg=name)
    torch.testing.assert_close(fast_out[5], ref_out[5], rtol=0, atol=0)  # load counts are exact


@pytest.mark.parametrize(
    "score,gate_on,k,balance",
    [
        ("sigmoid", "input", 1, "aux"),
        ("softmax", "output", 2, "aux"),
        ("sigmoid", "input", 3, "bias"),
        ("softmax", "input", 2, "none"),
    ],
)
def test_fast_equals_loop_with_padding_and_gradients(score, gate_on, k, balance):
    ref, fast = make_pair(score=score, gate_on=gate_on, top_k=k, balance=balance)
    ref.train(), fast.train()
    torch.manual_seed(1)
    x = torch.randn(3, 11, D)
    valid = torch.rand(3, 11) > 0.3
    modality = torch.randint(0, 3, (3, 11))
    g = torch.randn(3, 11, D)
    r, f = run(ref, x, valid, modality, g), run(fast, x, valid, modality, g)
    assert_same(r, f)
    assert r[5].sum() == valid.sum() * k  # only real tokens were counted
    assert all(v.abs().sum() > 0 for v in r[4].values())  # every gradient is exercised


def test_fast_with_zero_token_experts_and_skewed_routing():
    """Experts 2, 3 and 5 of 6 receive no token: their groups are padding rows only; the result,
    and the zero gradient of those experts, equal the loop's."""
    ref, fast = make_pair(n_experts=6, top_k=2, score="softmax", gate_on="output")
    x = torch.randn(2, 9, D)
    x[..., 0] = 3.0
    for m in (ref, fast):
        with torch.no_grad():
            m.router.gate.weight[[2, 3, 5], 0] = -30.0
    g = torch.randn(2, 9, D)
    r, f = run(ref, x, None, None, g), run(fast, x, None, None, g)
    assert_same(r, f)
    load = r[5].sum(0)
    assert (load[[2, 3, 5]] == 0).all() and load.sum() == 2 * 9 * 2
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        assert (f[4][name][[2, 3, 5]] == 0).all() and torch.isfinite(f[4][name]).all()


def test_fast_with_no_valid_token():
    ref, fast = make_pair(top_k=2)
    x = torch.randn(2, 5, D)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    g = torch.randn(2, 5, D)
    r, f = run(ref, x, valid, None, g), run(fast, x, valid, None, g)
    assert_same(r, f)
    assert f[1].item() == 0 and f[2].item() == 0 and f[5].sum() == 0
    assert all(torch.isfinite(v).all() for v in f[4].values())


def test_fast_bf16_close_to_fp32_reference():
    """In bf16 (the GPU dtype; `_grouped_mm` takes it on CPU too) fast stays as close to the fp32
    loop as the bf16 loop does, gradients included."""
    ref, fast = make_pair(top_k=2, gate_on="output", score="softmax")
    loop16 = copy.deepcopy(ref).to(torch.bfloat16)
    fast = fast.to(torch.bfloat16)
    x = torch.randn(2, 16, D)
    valid = torch.rand(2, 16) > 0.2
    g = torch.randn(2, 16, D)
    r = run(ref, x, valid, None, g)
    a = run(loop16, x.bfloat16(), valid, None, g.bfloat16())
    f = run(fast, x.bfloat16(), valid, None, g.bfloat16())
    for i in (0, 3):  # y, x.grad
        err_loop, err_fast = (a[i].float() - r[i]).abs().max(), (f[i].float() - r[i]).abs().max()
        assert f[i].dtype == torch.bfloat16 and err_fast <= 2 * err_loop + 1e-2
    for name, gr in r[4].items():
        err_loop = (a[4][name].float() - gr).abs().max()
        err_fast = (f[4][name].float() - gr).abs().max()
        assert err_fast <= 2 * err_loop + 1e-2 * gr.abs().max(), name


def test_non_finite_padding_changes_nothing():
    """Padding rows are never dispatched: garbage (inf, nan) there leaves every real output,
    the losses and the counts as they were."""
    _, fast = make_pair(top_k=2, n_shared=0)
    x = torch.randn(2, 7, D)
    valid = torch.rand(2, 7) > 0.4
    valid[0, 0] = True
    y, aux, z = fast(x, valid)
    load = fast.take_load()
    x2 = x.clone()
    x2[~valid] = float("nan")
    x2[~valid & (torch.arange(7) % 2 == 0)] = float("inf")
    y2, aux2, z2 = fast(x2, valid)
    torch.testing.assert_close(y2[valid], y[valid], rtol=0, atol=0)
    assert (y2[~valid] == 0).all()
    torch.testing.assert_close((aux2, z2), (aux, z), rtol=0, atol=0)
    torch.testing.assert_close(fast.take_load(), load, rtol=0, atol=0)


def test_aligned_layout():
    """Groups start on ALIGN rows, none is empty, the buffer size depends on M and E only, each
    kept row has its own slot inside its expert's group, dropped rows share the trash row."""
    torch.manual_seed(0)
    E, M, A = 5, 37, ALIGN
    expert = torch.randint(0, E, (M,))
    expert[expert == 3] = 1  # expert 3 receives nothing
    keep = torch.rand(M) > 0.2
    lay = layout_pairs(expert, keep, E)
    assert lay.rows == buffer_rows(M, E) and lay.rows % A == 0
    offs = lay.offs.long()
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    assert (starts % A == 0).all() and (offs - starts >= A).all() and offs[-1] == lay.rows
    torch.testing.assert_close(lay.counts, torch.bincount(expert[keep], minlength=E))
    kept = lay.dest[keep]
    assert kept.unique().numel() == int(keep.sum())  # no two rows share a slot
    assert (lay.dest[~keep] == lay.rows - 1).all() and (kept < lay.rows - 1).all()
    e_of_slot = torch.searchsorted(offs, kept, right=True)
    assert (e_of_slot == expert[keep]).all()  # inside its own expert's group
    for e in range(E):  # stable: a group keeps the input order
        mine = kept[expert[keep] == e]
        assert (mine.diff() > 0).all()


def test_run_sorted_equals_the_loop_for_the_dispatcher():
    """Under expert parallelism MoE keeps its dispatch and only the experts run here."""
    _, fast = make_pair(n_experts=4)
    x = torch.randn(13, D, requires_grad=True)
    counts = torch.tensor([5, 0, 8, 0])
    g = torch.randn(13, D)
    (run_sorted(fast.experts, x, counts) * g).sum().backward()
    gx, gw = x.grad.clone(), fast.experts.w2.grad.clone()
    x.grad = None
    fast.experts.zero_grad()
    (fast.experts.forward_loop(x, counts) * g).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, fast.experts.w2.grad)


def test_swiglu_backward():
    a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (a, b))


# ---------------------------------------------------------------------------------------------
# attention for packed sequences and torch.compile
# ---------------------------------------------------------------------------------------------


def packed_batch(dim: int, dtype=torch.float32):
    """Two rows: three documents, and one document followed by padding (doc id -1)."""
    B, T = 2, 40
    doc = torch.tensor([[0] * 11 + [1] * 21 + [2] * 8, [0] * 33 + [-1] * 7])
    pos = torch.stack(
        [
            torch.cat([torch.arange(11), torch.arange(21), torch.arange(8)]),
            torch.cat([torch.arange(33), torch.zeros(7, dtype=torch.long)]),
        ]
    )
    torch.manual_seed(3)
    return torch.randn(B, T, dim, dtype=dtype), pos, doc, doc >= 0


def llama4_decoder(*overrides: str) -> Decoder:
    # NoPE every 2nd layer with temperature, 8-token chunks on the others, QK norm, GQA
    cfg = load_config(
        None,
        [
            "model.n_layers=4",
            "model.nope_every=2",
            "model.attn_chunk=8",
            "model.qk_norm=true",
            "model.floor_scale=4",
            "model.moe.every=2",
            *overrides,
        ],
    ).model
    torch.manual_seed(0)
    return Decoder(cfg, 64)


def test_flex_attention_equals_dense_masks():
    dense = llama4_decoder("model.moe.path=fast")
    flex = copy.deepcopy(dense)
    flex.cfg = copy.deepcopy(dense.cfg)
    flex.cfg.attn_impl = "flex"
    h, pos, doc, valid = packed_batch(dense.cfg.dim)
    full, chunk, _ = flex.attention_inputs(pos, doc)
    assert not isinstance(full, torch.Tensor) and not isinstance(chunk, torch.Tensor)  # no T x T masks
    with torch.no_grad():
        ref, _, _ = dense(h, pos, doc, valid)
        out, _, _ = flex(h, pos, doc, valid)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # the masks matter: ignoring the documents changes the result
        other, _, _ = flex(h, pos, torch.zeros_like(doc), valid)
        assert (other - ref).abs().max() > 1e-3


def test_flex_training_off_cuda_is_a_clear_error():
    dec = llama4_decoder("model.attn_impl=flex")
    h, pos, doc, valid = packed_batch(dec.cfg.dim)
    with pytest.raises(ValueError, match="model.attn_impl"):
        dec(h.requires_grad_(True), pos, doc, valid)


def test_config_keys():
    cfg = load_config(None, ["model.moe.path=fast", "model.attn_impl=flex", "train.compile=true"])
    assert (cfg.model.moe.path, cfg.model.attn_impl, cfg.train.compile) == ("fast", "flex", True)
    with pytest.raises(ConfigError, match="model.attn_impl"):
        load_config(None, ["model.attn_impl=varlen"])
    with pytest.raises(ConfigError, match="model.moe.path"):
        load_config(None, ["model.moe.path=fastest"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=maybe"])


def test_compiled_blocks_are_whole_graphs_and_match_eager():
    """With path fast every block traces into one graph (fullgraph: no break, no host sync) and
    gives eager's outputs and gradients. aot_eager: the graph capture and autograd of
    torch.compile without code generation (inductor takes minutes on a CPU; tests/gpu runs it)."""
    eager = llama4_decoder("model.moe.path=fast").to(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend="aot_eager", fullgraph=True)
    h, pos, doc, valid = packed_batch(eager.cfg.dim, torch.bfloat16)
    g = torch.randn(*h.shape[:2], 64, dtype=torch.bfloat16)
    results = []
    for model in (eager, compiled):
        x = h.clone().requires_grad_(True)
        logits, aux, z = model(x, pos, doc, valid)
        ((logits.float() * g.float()).sum() + aux + z).backward()
        results.append(
            (
                logits.float(),
                x.grad.float(),
                {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    (l0, x0, g0), (l1, x1, g1) = results
    torch.testing.assert_close(l1, l0, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x1, x0, atol=2e-2, rtol=2e-2)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=5e-2, rtol=5e-2, msg=name)
