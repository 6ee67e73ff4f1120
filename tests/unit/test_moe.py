"""MoE layer: router semantics, dense equivalence, grouped == loop (with gradients), padding,
load statistics, and that each balancing mode actually balances a skewed toy router."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fusion.config import MoEConfig
from fusion.model.ffn import FeedForward
from fusion.model.moe import PATHS, MoE, Router, grouped_mm_supported

D, H = 8, 16  # fp32 rows of 32 and 64 bytes: _grouped_mm wants row strides that are multiples of 16 bytes


def make_cfg(**kw) -> MoEConfig:
    base = dict(
        n_experts=4,
        top_k=1,
        n_shared=0,
        moe_ffn_dim=H,
        score="softmax",
        gate_on="output",
        balance="none",
        z_coef=0.0,
        path="loop",
    )
    base.update(kw)
    return MoEConfig(**base)


def make_moe(seed: int = 0, init_std: float = 0.3, **kw) -> MoE:
    torch.manual_seed(seed)
    return MoE(D, make_cfg(**kw), init_std=init_std)


def with_path(moe: MoE, path: str) -> MoE:
    """The same layer (weights and bias) on another compute path, which is chosen at construction."""
    other = MoE(D, dataclasses.replace(moe.cfg, path=path))
    other.load_state_dict(moe.state_dict())
    return other


def expert_ffn(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = moe.experts
    return (F.silu(x @ ex.w1[e]) * (x @ ex.w3[e])) @ ex.w2[e]


def per_token_oracle(moe: MoE, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token, expert by expert: shares no dispatch code with MoE.forward."""
    B, T, _ = x.shape
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            if moe.shared is not None:
                y[b, t] += moe.shared(x[b, t])
            if not valid[b, t]:
                continue
            idx, gates, _ = moe.router(x[b, t][None])
            for e, g in zip(idx[0].tolist(), gates[0]):
                if moe.cfg.gate_on == "input":
                    y[b, t] += expert_ffn(moe, e, x[b, t] * g)
                else:
                    y[b, t] += g * expert_ffn(moe, e, x[b, t])
    return y


def skew_router(moe: MoE, x: torch.Tensor, allowed: list[int], strength: float = 2.0) -> None:
    """Feature 0 of x becomes a constant 3; experts outside `allowed` get a large negative logit."""
    x[..., 0] = 3.0
    with torch.no_grad():
        w = moe.router.gate.weight
        w.copy_(0.1 * torch.randn_like(w))
        w[:, 0] = -strength
        w[allowed, 0] = strength


# ---------------------------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_sigmoid_router_topk_on_logits_and_gate_is_sigmoid_of_chosen(k):
    torch.manual_seed(0)
    router = Router(D, make_cfg(n_experts=6, top_k=k, score="sigmoid"))
    x = torch.randn(20, D)
    idx, gates, logits = router(x)
    assert idx.shape == gates.shape == (20, k) and logits.shape == (20, 6)
    assert idx.dtype == torch.long and gates.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ router.gate.weight.T)
    ref = logits.topk(k, dim=-1)
    torch.testing.assert_close(idx.sort(-1).values, ref.indices.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(gates, logits.gather(-1, idx).sigmoid())
    # the chosen are the k largest: every unchosen logit is below the smallest chosen one
    unchosen = logits.scatter(-1, idx, float("-inf"))
    assert (unchosen.max(-1).values < logits.gather(-1, idx).min(-1).values).all()


def test_softmax_router_topk_on_probs_and_norm_topk():
    torch.manual_seed(0)
    x = torch.randn(20, D)
    router = Router(D, make_cfg(n_experts=6, top_k=2, score="softmax", norm_topk=False))
    idx, gates, logits = router(x)
    probs = logits.softmax(-1)
    torch.testing.assert_close(idx.sort(-1).values, probs.topk(2, -1).indices.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(gates, probs.gather(-1, idx))
    assert (gates.sum(-1) < 1 - 1e-3).all()  # raw probabilities of 2 of 6 experts

    router.cfg.norm_topk = True
    idx2, gates2, _ = router(x)
    torch.testing.assert_close(idx2, idx, rtol=0, atol=0)
    torch.testing.assert_close(gates2.sum(-1), torch.ones(20))
    torch.testing.assert_close(gates2, gates / gates.sum(-1, keepdim=True))


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_bias_changes_the_choice_but_not_the_gate_value(score):
    torch.manual_seed(0)
    router = Router(D, make_cfg(n_experts=4, top_k=1, score=score, balance="bias"))
    x = torch.randn(30, D)
    idx0, _, logits = router(x)
    loser = int(torch.bincount(idx0[:, 0], minlength=4).argmin())
    router.expert_bias[loser] = 100.0
    idx, gates, logits2 = router(x)
    assert (idx[:, 0] == loser).all()
    torch.testing.assert_close(logits2, logits)
    raw = logits[:, loser]
    expected = raw.sigmoid() if score == "sigmoid" else logits.softmax(-1)[:, loser]
    torch.testing.assert_close(gates[:, 0], expected)
    # outside balance="bias" the buffer is ignored
    router.cfg.balance = "none"
    torch.testing.assert_close(router(x)[0], idx0, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# equivalences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,impl", [("loop", "auto"), ("grouped", "grouped_mm"), ("grouped", "bmm")])
def test_one_expert_equals_dense_ffn(path, impl):
    moe = make_moe(n_experts=1, top_k=1, score="softmax", gate_on="output", path=path)
    moe.experts.impl = impl
    dense = FeedForward(D, H)
    with torch.no_grad():
        dense.w1.weight.copy_(moe.experts.w1[0].T)
        dense.w3.weight.copy_(moe.experts.w3[0].T)
        dense.w2.weight.copy_(moe.experts.w2[0].T)
    x = torch.randn(2, 5, D)
    y, _, _ = moe(x)
    torch.testing.assert_close(y, dense(x))


@pytest.mark.parametrize(
    "score,gate_on,k", [("sigmoid", "input", 1), ("softmax", "output", 2), ("sigmoid", "output", 2)]
)
@pytest.mark.parametrize("path", ["loop", "grouped"])
def test_moe_matches_per_token_oracle_with_shared_expert_and_padding(score, gate_on, k, path):
    moe = make_moe(n_shared=1, score=score, gate_on=gate_on, top_k=k, path=path)
    x = torch.randn(2, 6, D)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    y, _, _ = moe(x, valid)
    torch.testing.assert_close(y, per_token_oracle(moe, x, valid))


def test_compute_path_is_picked_when_the_layer_is_built():
    assert [make_moe(path=p).path for p in ("loop", "grouped", "fast")] == [PATHS[p] for p in PATHS]
    moe = make_moe(path="grouped")
    moe.experts.impl = "bmm"
    calls = []
    bmm = moe.experts._bmm
    moe.experts._bmm = lambda *a: calls.append(1) or bmm(*a)
    moe.cfg.path = "loop"  # too late: the layer keeps the path it was built with
    moe(torch.randn(2, 3, D))
    assert calls == [1]
    with pytest.raises(ValueError, match=r"model\.moe\.path.*'fastest'"):
        make_moe(path="fastest")


CASES = ["plain", "unused_experts", "padding"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("gate_on", ["input", "output"])
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [1, 2])
def test_grouped_equals_loop_outputs_and_grads(k, score, gate_on, impl, case):
    loop = make_moe(
        seed=1, top_k=k, score=score, gate_on=gate_on, n_shared=1, path="loop", balance="aux", z_coef=1e-3
    )
    x = torch.randn(3, 7, D)
    valid = None
    if case == "unused_experts":
        skew_router(loop, x, allowed=[0, 1])
    if case == "padding":
        valid = torch.rand(3, 7) > 0.3
        valid[0] = False  # one sequence entirely padding
    grouped = with_path(loop, "grouped")
    grouped.experts.impl = impl
    r = torch.randn(3, 7, D)

    results = []
    for moe in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        y, aux, z = moe(xi, valid)
        ((y * r).sum() + aux + z).backward()
        grads = [xi.grad] + [p.grad for p in moe.parameters()]
        results.append((y, aux, z, grads))
    (y0, aux0, z0, g0), (y1, aux1, z1, g1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(aux1, aux0)
    torch.testing.assert_close(z1, z0)
    assert len(g0) == len(g1) == 1 + 3 + 1 + 3  # x, w1 w3 w2, router, shared w1 w3 w2
    for a, b in zip(g0, g1):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a)
    if case == "unused_experts":
        load = loop.take_load().sum(0)
        assert load[0] > 0 and load[2:].sum() == 0  # the case really has empty experts
        assert loop.experts.w1.grad[2:].abs().sum() == 0
    if case == "padding":
        assert 0 < valid.sum() < valid.numel()


@pytest.mark.parametrize("path,impl", [("loop", "auto"), ("grouped", "grouped_mm"), ("grouped", "bmm")])
def test_zero_valid_tokens(path, impl):
    moe = make_moe(top_k=2, path=path, balance="aux", z_coef=1e-3)
    moe.experts.impl = impl
    x = torch.randn(2, 3, D, requires_grad=True)
    y, aux, z = moe(x, torch.zeros(2, 3, dtype=torch.bool))
    assert (y == 0).all() and aux.item() == 0 and z.item() == 0
    (y.sum() + aux + z).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.parameters())
    assert (moe.take_load() == 0).all()


def test_grouped_mm_backward_takes_a_stride0_gradient():
    # y.sum().backward() sends an expanded (stride-0) gradient, which raw _grouped_mm rejects
    moe = make_moe(n_experts=3)
    x = torch.randn(10, D, requires_grad=True)
    counts = torch.tensor([4, 0, 6])
    moe.experts.forward_grouped(x, counts, impl="grouped_mm").sum().backward()
    gx = x.grad.clone()
    x.grad = None
    moe.experts.forward_loop(x, counts).sum().backward()
    torch.testing.assert_close(gx, x.grad)


def test_grouped_mm_support_check_and_auto_fallback():
    w = torch.zeros(2, 8, 16)
    assert grouped_mm_supported(torch.zeros(3, 8), w)
    assert not grouped_mm_supported(torch.zeros(3, 8, dtype=torch.float64), w.double())  # no fp64 kernel
    assert not grouped_mm_supported(torch.zeros(3, 6), torch.zeros(2, 6, 16))  # 24-byte rows
    torch.manual_seed(0)
    moe = MoE(6, make_cfg(moe_ffn_dim=10))
    x = torch.randn(7, 6)
    counts = torch.tensor([3, 0, 4, 0])
    with pytest.raises(ValueError, match="does not support"):
        moe.experts.forward_grouped(x, counts, impl="grouped_mm")
    torch.testing.assert_close(
        moe.experts.forward_grouped(x, counts),  # auto falls back to bmm
        moe.experts.forward_loop(x, counts),
    )
    moe.double()
    torch.testing.assert_close(
        moe.experts.forward_grouped(x.double(), counts), moe.experts.forward_loop(x.double(), counts)
    )


def test_bf16_keeps_dtype_and_losses_stay_fp32():
    moe = make_moe(top_k=2, path="grouped", balance="aux", z_coef=1e-3).to(torch.bfloat16)
    x = torch.randn(2, 4, D, dtype=torch.bfloat16)
    y, aux, z = moe(x)
    assert y.dtype == torch.bfloat16 and aux.dtype == z.dtype == torch.float32
    ref, _, _ = make_moe(top_k=2, path="loop", balance="aux", z_coef=1e-3).to(torch.bfloat16)(x)
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# padding, losses and statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["loop", "grouped"])
@pytest.mark.parametrize("k", [1, 2])
def test_padding_is_not_routed_counted_or_in_the_losses(path, k):
    moe = make_moe(top_k=k, path=path, score="sigmoid", gate_on="input", balance="aux", z_coef=1e-3)
    x = torch.randn(3, 8, D)
    valid = torch.rand(3, 8) > 0.4
    n_valid = int(valid.sum())
    y, aux, z = moe(x, valid)
    load = moe.take_load()
    assert load.sum().item() == n_valid * k
    assert (y[~valid] == 0).all()  # n_shared=0: padding output is exactly zero
    assert (y[valid].abs().sum(-1) > 0).all()

    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), D)
    y2, aux2, z2 = moe(x2, valid)
    torch.testing.assert_close(aux2, aux, rtol=0, atol=0)
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    torch.testing.assert_close(y2[valid], y[valid], rtol=0, atol=0)
    torch.testing.assert_close(moe.take_load(), load, rtol=0, atol=0)


def test_aux_and_z_loss_values():
    moe = make_moe(n_experts=4, top_k=2, balance="aux", z_coef=1e-3)
    with torch.no_grad():
        moe.router.gate.weight.zero_()  # uniform router: P_e = 1/E, logits 0
    x = torch.randn(2, 5, D)
    _, aux, z = moe(x)
    # E * sum_e f_e / E = sum_e f_e = 1 whatever the assignment; logsumexp(0,...,0) = log E
    torch.testing.assert_close(aux, torch.tensor(1.0))
    torch.testing.assert_close(z, torch.tensor(4.0).log().square())

    for score in ("softmax", "sigmoid"):
        moe = make_moe(n_experts=4, top_k=2, balance="aux", score=score, z_coef=1e-3)
        x = torch.randn(2, 5, D)
        _, aux, z = moe(x)
        idx, _, logits = moe.router(x.reshape(10, D))
        f = torch.bincount(idx.reshape(-1), minlength=4).float() / 20
        if score == "softmax":
            probs = logits.softmax(-1)
        else:  # per-token sigmoid scores normalised to sum 1
            probs = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
        torch.testing.assert_close(aux, 4 * (f * probs.mean(0)).sum())
        torch.testing.assert_close(z, (logits.logsumexp(-1) ** 2).mean())
        aux.backward()
        assert moe.router.gate.weight.grad.abs().sum() > 0
        assert moe.experts.w1.grad is None  # aux only reaches the router

    for kw in (dict(balance="bias"), dict(balance="none")):
        _, aux, z = make_moe(z_coef=0.0, **kw)(x)
        assert aux.item() == 0 and z.item() == 0


def test_load_rows_per_modality():
    moe = make_moe(top_k=2)
    x = torch.randn(2, 9, D)
    modality = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 0, 0, 2, 2, 2]])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 7:] = False  # two padded video tokens
    moe(x, valid, modality)
    load = moe.take_load()
    assert load.shape == (3, 4) and load.dtype == torch.float64
    idx, _, _ = moe.router(x.reshape(18, D))
    for m in range(3):
        mine = (modality.reshape(-1) == m) & valid.reshape(-1)
        expected = torch.bincount(idx[mine].reshape(-1), minlength=4).double()
        torch.testing.assert_close(load[m], expected, rtol=0, atol=0)
    assert load.sum(1).tolist() == [2 * 6, 2 * 7, 2 * 3]


def test_take_load_resets_and_eval_does_not_count():
    moe = make_moe(top_k=1)
    x = torch.randn(2, 5, D)
    moe(x)
    moe(x)
    assert moe.take_load().sum().item() == 20
    assert moe.take_load().sum().item() == 0
    moe.eval()
    moe(x)
    assert moe.load.sum().item() == 0
    assert "load" not in moe.state_dict() and "router.expert_bias" in moe.state_dict()


def test_only_routed_expert_params_are_tagged_expert():
    """`expert` is what keeps a parameter out of the DeepSpeed engine (fusion/parallel/)."""
    moe = make_moe(n_shared=1)
    tagged = {n for n, p in moe.named_parameters() if getattr(p, "expert", False)}
    assert tagged == {"experts.w1", "experts.w2", "experts.w3"}
    assert all(moe.get_parameter(n).shape[0] == moe.cfg.n_experts for n in tagged)  # expert axis first


# ---------------------------------------------------------------------------------------------
# balancing: each mode moves a skewed toy router toward uniform load
# ---------------------------------------------------------------------------------------------


def skewed_problem(**kw) -> tuple[MoE, torch.Tensor]:
    """A router that sends most of 256 tokens to expert 0 (x has a constant feature 0)."""
    moe = make_moe(seed=0, n_experts=4, top_k=1, **kw)
    x = torch.randn(1, 256, D)
    skew_router(moe, x, allowed=[0], strength=0.5)
    return moe, x


def imbalance(moe: MoE, x: torch.Tensor) -> float:
    moe.train()
    moe.take_load()
    moe(x)
    load = moe.take_load().sum(0)
    return (load.max() / load.mean()).item()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_balances(score):
    moe, x = skewed_problem(score=score, balance="aux")
    before = imbalance(moe, x)
    # Adam, not plain SGD: with one shared constant feature SGD moves every token at once and
    # can flip the whole batch onto another expert; Adam's bounded steps balance on every seed tried
    opt = torch.optim.Adam(moe.router.parameters(), lr=0.05)
    aux_first = None
    for _ in range(25):
        _, aux, _ = moe(x)
        aux_first = aux.item() if aux_first is None else aux_first
        opt.zero_grad()
        aux.backward()
        opt.step()
    after = imbalance(moe, x)
    assert before > 3.0  # really skewed: nearly everything on one of 4 experts
    assert after < 0.5 * before, (before, after)
    assert moe(x)[1].item() < 0.7 * aux_first


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_bias_balances_without_gradients(score):
    moe, x = skewed_problem(score=score, balance="bias", bias_rate=0.05)
    before = imbalance(moe, x)
    weights = moe.router.gate.weight.clone()
    recent = torch.zeros(4, dtype=torch.float64)
    for step in range(40):
        moe(x)
        load = moe.take_load().sum(0)
        moe.update_bias(load)
        if step >= 30:  # sign updates oscillate by ~bias_rate: judge the load over the last steps
            recent += load
    after = (recent.max() / recent.mean()).item()
    assert before > 3.0
    assert after < 0.5 * before, (before, after)
    assert abs(moe.router.expert_bias.mean().item()) < 1e-6  # re-centred (torchtitan #1506)
    torch.testing.assert_close(moe.router.gate.weight, weights, rtol=0, atol=0)


def test_update_bias_step_and_noop_outside_bias_mode():
    moe = make_moe(balance="bias", bias_rate=0.1)
    moe.update_bias(torch.tensor([10.0, 0.0, 2.0, 4.0]))  # mean 4: over, under, under, equal
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.0]) - 0.025)
    moe = make_moe(balance="aux", bias_rate=0.1)
    moe.update_bias(torch.tensor([10.0, 0.0, 2.0, 4.0]))
    assert (moe.router.expert_bias == 0).all()


def test_z_loss_step_shrinks_logits():
    moe, x = skewed_problem(score="softmax", z_coef=1e-3)
    moe.router.gate.weight.data *= 3  # large logits for z-loss to act on
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.01)

    def logit_size() -> float:
        # z-loss pulls logsumexp, i.e. the largest logit, toward 0 (it may push the others down)
        return moe.router(x.reshape(-1, D))[2].max(-1).values.mean().item()

    _, _, z0 = moe(x)
    size0 = logit_size()
    for _ in range(10):
        _, _, z = moe(x)
        opt.zero_grad()
        z.backward()
        opt.step()
    _, _, z1 = moe(x)
    assert z1.item() < 0.5 * z0.item(), (z0.item(), z1.item())
    assert size0 > 3.0 and logit_size() < 0.5 * size0, (size0, logit_size())


# ---------------------------------------------------------------------------------------------
# group-limited routing (DeepSeek-V3 node-limited)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score,k,topk_groups", [("sigmoid", 4, 2), ("softmax", 2, 1), ("sigmoid", 3, 4)])
def test_group_limited_routing_keeps_each_token_in_its_best_groups(score, k, topk_groups):
    """8 experts in 4 groups of 2: every token's experts lie in at most topk_groups groups, and
    those are its best groups by the documented score (sigmoid: sum of the group's top-2 selection
    scores; softmax: its best probability); inside them the top-k is exact."""
    torch.manual_seed(0)
    E, G = 8, 4
    limited = Router(
        D, make_cfg(n_experts=E, top_k=k, score=score, n_groups=G, topk_groups=topk_groups, balance="bias")
    )
    with torch.no_grad():
        limited.expert_bias.copy_(torch.randn(E) * 0.3)
    free = copy.deepcopy(limited)
    free.n_groups = free.topk_groups = 1
    x = torch.randn(400, D) * 3
    idx, gates, logits = limited(x)
    groups_used = (idx // (E // G)).sort(-1).values
    n_groups_used = (groups_used.diff(dim=-1) != 0).sum(-1) + 1  # (N,)
    assert (n_groups_used <= topk_groups).all()

    scores = logits if score == "sigmoid" else logits.softmax(-1)
    choice = (scores + limited.expert_bias).view(-1, G, E // G)
    group_score = choice.topk(2, -1).values.sum(-1) if score == "sigmoid" else choice.max(-1).values
    best = group_score.topk(topk_groups, -1).indices.sort(-1).values  # (N, topk_groups)
    for t in range(x.shape[0]):
        assert set(groups_used[t].tolist()) <= set(best[t].tolist())
        allowed = torch.cat([torch.arange(g * 2, g * 2 + 2) for g in best[t].tolist()])
        expect = allowed[choice.view(-1, E)[t, allowed].topk(k).indices]
        assert sorted(idx[t].tolist()) == sorted(expect.tolist())
    # the gate is still the raw score of the chosen expert
    expected_gate = scores.gather(-1, idx)
    torch.testing.assert_close(gates, expected_gate.sigmoid() if score == "sigmoid" else expected_gate)
    if topk_groups < G:  # the limit binds: unconstrained routing spans more groups for some tokens
        free_groups = (free(x)[0] // (E // G)).sort(-1).values
        assert ((free_groups.diff(dim=-1) != 0).sum(-1) + 1 > topk_groups).any()
    else:  # all groups allowed: same as no grouping
        torch.testing.assert_close(free(x)[0].sort(-1).values, idx.sort(-1).values, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.moe.n_experts=8", "model.moe.n_groups=3"], "model.moe.n_groups"),
        (["model.moe.n_groups=0"], "model.moe.n_groups"),
        (
            ["model.moe.n_experts=8", "model.moe.n_groups=4", "model.moe.topk_groups=5"],
            "model.moe.topk_groups",
        ),
        (
            ["model.moe.n_experts=8", "model.moe.n_groups=4", "model.moe.topk_groups=0"],
            "model.moe.topk_groups",
        ),
        (
            ["model.moe.n_experts=8", "model.moe.top_k=3", "model.moe.n_groups=4", "model.moe.topk_groups=1"],
            "model.moe.topk_groups",
        ),
        (["model.moe.n_experts=4", "model.moe.ep_size=3"], "model.moe.ep_size"),
        (["train.activation_checkpointing=-1"], "train.activation_checkpointing"),
    ],
)
def test_moe_parallel_and_group_keys_are_validated(overrides, key):
    from fusion.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_ep_size_must_divide_the_world():
    from fusion.config import ConfigError, finalize, load_config

    cfg = load_config(None, ["model.moe.ep_size=2"])  # accepted: expert parallelism exists
    assert finalize(cfg, 4).world_size == 4
    with pytest.raises(ConfigError, match=r"model\.moe\.ep_size.*world size 3"):
        finalize(cfg, 3)


# ---------------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every,early_stop", [(1, False), (2, True)])
def test_activation_checkpointing_same_losses_grads_and_router_stats(every, early_stop):
    """Recomputing layers in backward changes nothing a user sees: loss, every gradient, aux and
    z losses, and the per-modality expert loads (counted once, not again on recompute). Without
    early stop the recompute runs each layer to its end, load counting included."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from fusion.config import load_config
    from fusion.data.tokenizer import ByteTokenizer
    from fusion.model.fusion import build_model

    cfg = load_config(
        None,
        [
            "model.size=debug",
            "model.n_layers=3",
            "model.moe.top_k=2",
            "model.moe.balance=aux",
            "model.moe.path=loop",
        ],
    )
    torch.manual_seed(0)
    plain = build_model(cfg.model, ByteTokenizer())
    ckpt = copy.deepcopy(plain)
    ckpt.decoder.checkpoint_every = every
    ids = torch.randint(0, 256, (2, 24))
    modality = torch.randint(0, 3, (2, 24))  # per-sample modality for the loss split

    outs, grads, loads, calls = [], [], [], []
    for model in (plain, ckpt):
        n_calls = [0] * len(model.moe_layers)
        for i, m in enumerate(model.moe_layers):
            m.register_forward_pre_hook(lambda *_, i=i, n=n_calls: n.__setitem__(i, n[i] + 1))
        calls.append(n_calls)
        model.train()
        with set_checkpoint_early_stop(early_stop):
            out = model(ids, labels=ids.roll(-1, 1), sample_modality=modality)
            out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        loads.append(torch.stack([m.take_load() for m in model.moe_layers]))
    assert loads[0].sum() == 2 * 24 * 2 * len(plain.moe_layers)  # tokens x top_k, per layer
    torch.testing.assert_close(loads[1], loads[0], rtol=0, atol=0)
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "loss_sum", "loss_count"):
        torch.testing.assert_close(getattr(outs[1], key), getattr(outs[0], key), rtol=1e-6, atol=1e-7)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
    # the recompute really ran: checkpointed layers (0, every, 2*every, ...) ran forward twice
    assert calls[0] == [1, 1, 1]
    assert calls[1] == [2 if i % every == 0 else 1 for i in range(3)]
