"""Expert-parallel pieces on two gloo CPU processes: the all-to-all dispatcher reproduces the
single-device MoE layer (outputs and every gradient), and DeepSpeed's view of the model hides
exactly the routed experts."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusion.config import MoEConfig
from fusion.model.moe import MoE
from fusion.parallel import EngineView, ExpertDispatcher, expert_parameter_names
from tests.conftest import free_port

D, H, E = 8, 16, 4


def _build(cfg: MoEConfig, skew: bool) -> MoE:
    torch.manual_seed(0)
    moe = MoE(D, cfg, init_std=0.3)
    if skew:  # feature 0 (set large in the inputs) pulls every token to experts 0 and 1
        with torch.no_grad():
            moe.router.gate.weight[:, 0] = torch.tensor([5.0, 4.0, -5.0, -5.0])
    return moe


def _reference(cfg: MoEConfig, xs: list[torch.Tensor], skew: bool):
    """One device, all experts: each rank's batch run separately, grads summed (what the ranks
    jointly compute before any reduction)."""
    moe = _build(cfg, skew)
    outs = []
    for x, valid in zip(xs, _valid(cfg.path)):
        x = x.clone().requires_grad_(True)
        y, _, _ = moe(x, valid)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        outs.append((y.detach(), x.grad))
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return outs, grads


CASES = [  # (top_k, expert path, skew)
    (2, "grouped", False),
    (1, "loop", True),  # every token goes to rank 0's experts: rank 1's experts get no rows at all
    (2, "fast", False),  # with padding tokens (below): their pairs sort last and are not sent
    (1, "fast", True),
]


def _valid(path: str) -> list[torch.Tensor | None]:
    """Padding masks for the fast cases (the last tokens of some rows are padding)."""
    if path != "fast":
        return [None, None]
    first = torch.ones(2, 5, dtype=torch.bool)
    first[0, 3:] = False
    second = torch.ones(1, 7, dtype=torch.bool)
    second[0, 6] = False
    return [first, second]


def _cfg(k: int, path: str) -> MoEConfig:
    return MoEConfig(
        n_experts=E,
        top_k=k,
        n_shared=1,
        moe_ffn_dim=H,
        score="softmax",
        gate_on="output",
        balance="none",
        z_coef=0.0,
        path=path,
    )


def _inputs(skew: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 5, D, generator=g), torch.randn(1, 7, D, generator=g)]  # uneven per rank
    if skew:
        for x in xs:
            x[..., 0] = 10.0
    return xs


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = []
        for k, path, skew in CASES:
            moe = _build(_cfg(k, path), skew)
            El = E // 2
            for name in ("w1", "w2", "w3"):  # this rank's experts, as fusion.parallel shards them
                full = getattr(moe.experts, name)
                setattr(
                    moe.experts, name, torch.nn.Parameter(full.detach()[rank * El : (rank + 1) * El].clone())
                )
            moe.dispatcher = ExpertDispatcher(None, 2, E)
            x = _inputs(skew)[rank].requires_grad_(True)
            y, _, _ = moe(x, _valid(path)[rank])
            (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
            results.append((y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dispatcher_matches_single_device(tmp_path):
    """Two ranks, two experts each, uneven batches: outputs, input grads and expert grads equal
    one device holding all four experts, for top-2 grouped, top-1 loop and the fast path with
    padding tokens, and when one rank's experts receive nothing."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in range(2)}

    El = E // 2
    for c, (k, path, skew) in enumerate(CASES):
        ref_outs, ref_grads = _reference(_cfg(k, path), _inputs(skew), skew)
        if skew:
            assert ref_grads["experts.w1"][2:].abs().sum() == 0  # really no rows for experts 2, 3
        for rank in range(2):
            y, xg, grads = results[rank][c]
            torch.testing.assert_close(y, ref_outs[rank][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(xg, ref_outs[rank][1], rtol=1e-5, atol=1e-6)
            for name in ("experts.w1", "experts.w2", "experts.w3"):
                # the owner's expert grad already holds both ranks' tokens
                torch.testing.assert_close(
                    grads[name], ref_grads[name][rank * El : (rank + 1) * El], rtol=1e-5, atol=1e-6
                )
        # dense parts (router, shared expert): the two ranks' grads sum to the reference
        for name in ref_grads:
            if not name.startswith("experts."):
                torch.testing.assert_close(
                    results[0][c][2][name] + results[1][c][2][name], ref_grads[name], rtol=1e-5, atol=1e-6
                )


def test_engine_view_hides_exactly_the_experts():
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=E, top_k=1, n_shared=1, moe_ffn_dim=H)
    model = torch.nn.Sequential(MoE(D, cfg), MoE(D, cfg))
    names = expert_parameter_names(model)
    assert sorted(names) == sorted(f"{i}.experts.{w}" for i in range(2) for w in ("w1", "w2", "w3"))
    view = EngineView(model, set(names))
    seen = {n for n, _ in view.named_parameters()}
    assert seen == {n for n, _ in model.named_parameters()} - set(names)
    assert len(list(view.parameters())) == len(seen)
    sd = view.state_dict()
    assert not set(names) & set(sd) and "0.router.expert_bias" in sd

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    EngineView(other, set(names)).load_state_dict(sd)  # strict, experts not required
    for n, p in other.named_parameters():
        ref = model.get_parameter(n)
        assert torch.equal(p, ref) != (n in names)  # dense loaded, experts untouched
    del sd["0.router.gate.weight"]
    with pytest.raises(RuntimeError, match="0.router.gate.weight"):
        EngineView(other, set(names)).load_state_dict(sd)


def test_restore_buffer_dtypes_after_a_cast_of_the_whole_model():
    """`module.to(bf16)` casts buffers too: the router bias goes back to fp32 and the load counts
    to float64 (values kept), and a model already right is left alone."""
    from fusion.parallel import restore_buffer_dtypes

    cfg = MoEConfig(n_experts=E, top_k=1, n_shared=1, moe_ffn_dim=H)
    model = torch.nn.Sequential(MoE(D, cfg), MoE(D, cfg))
    model[0].router.expert_bias.fill_(0.5)
    model.to(torch.bfloat16)
    assert model[0].router.expert_bias.dtype == torch.bfloat16 and model[0].load.dtype == torch.bfloat16
    assert sorted(restore_buffer_dtypes(model)) == sorted(
        f"{i}.{b}" for i in range(2) for b in ("router.expert_bias", "load")
    )
    for moe in model:
        assert moe.router.expert_bias.dtype == torch.float32 and moe.load.dtype == torch.float64
        assert moe.router.gate.weight.dtype == torch.bfloat16  # parameters stay as cast
    assert torch.equal(model[0].router.expert_bias, torch.full((E,), 0.5))
    assert restore_buffer_dtypes(model) == []
    assert "0.router.expert_bias" in model.state_dict()  # still registered, still persistent
