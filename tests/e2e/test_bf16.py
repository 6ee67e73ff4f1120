"""bf16 end to end on two CPU ranks (gloo), with fp32 gradient accumulation.

- Through the DeepSpeed launcher: configs/debug.yaml in bf16 with ZeRO-1 (DeepSpeed's
  BF16_Optimizer), model.moe.ep_size=2 and train.grad_accum=2 against the same run in fp32.
  Measured on a 2-core VM: over these 12 steps the bf16 losses lie within 0.0030 of the fp32 ones
  (0.0031 over 20 steps) and the grad norms within 0.4%; the test allows 0.02 and 5%. (Summing
  two micro-steps in bf16 instead moves these figures little: 0.0029; the probes below are what
  tell the two apart.)
- In one two-rank world (torch.multiprocessing, no launcher), for ZeRO 0, 1 and 2 and ep_size 1
  and 2, on a real DeepSpeed engine: the gradients of two micro-steps are summed in fp32 (a sum
  bf16 cannot hold: 0.5 + 2**-11), dense ones in DeepSpeed or fusion.parallel and routed experts
  in their fp32 master gradients, and reduced between ranks in fp32; reduce_grads and step read
  nothing on the host and return the norm as a tensor; a step NonFiniteGuard skips leaves the
  weights, the master weights and both optimizers' state untouched, and the next step is clean;
  the MoE buffers keep fp32 / float64 even when the engine is told to cast buffers. Then
  `fusion.train.train` runs 5 bf16 steps of each config: losses finite, falling and the same at
  every stage and ep size, the router bias saved in fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from fusion.checkpoint import safe_torch_load
from tests.conftest import BIN, free_port, run_cli

pytestmark = pytest.mark.slow

STEPS = 12
TOLERANCE = 0.02  # |loss_bf16 - loss_fp32| per step; measured at most 0.0031
LAUNCHED = [
    "--config",
    "configs/debug.yaml",
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.lr=3e-3",
    "train.warmup=3",
    "data.num_workers=1",
    "data.shuffle_buffer=32",
    "train.zero_stage=1",
    "model.moe.ep_size=2",
    "train.grad_accum=2",
    f"train.steps={STEPS}",
    "train.ckpt_every=0",
]

CONFIGS = [(zero, ep) for zero in (0, 1, 2) for ep in (1, 2)]
WRAPPER = {0: "FP16_UnfusedOptimizer", 1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer"}
TRAIN_STEPS = 5
FP32_SUM = 0.5 + 2.0**-11  # what two micro-steps of gradient 0.5 and 2**-11 add up to
BF16_SUM = 0.5  # ... summed in bf16 (its spacing at 0.5 is 2**-8)


# ---------------------------------------------------------------------------------------------
# through the launcher: bf16 against fp32
# ---------------------------------------------------------------------------------------------


def launch(precision: str, run_dir, text_shards):
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "fusion.train",
        *LAUNCHED,
        f"train.precision={precision}",
        f"data.text={text_shards}",
        f"run.dir={run_dir}",
    ]
    r = run_cli(cmd, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


def test_bf16_trains_like_fp32(text_shards, tmp_path):
    bf16 = launch("bf16", tmp_path / "bf16", text_shards)
    fp32 = launch("fp32", tmp_path / "fp32", text_shards)
    # the run's DeepSpeed config (kept in its checkpoint) asked for fp32 accumulation and reduction,
    # and DeepSpeed's BF16_Optimizer wrote the optimizer state (its ZeRO optimizer would have
    # saved its loss scaler and stage too)
    step_dir = tmp_path / "bf16" / "checkpoints" / f"step_{STEPS}"
    ds_config = safe_torch_load(step_dir / "mp_rank_00_model_states.pt")["ds_config"]
    assert (
        ds_config["data_types"]["grad_accum_dtype"] == "fp32"
        and ds_config["communication_data_type"] == "fp32"
    )
    optim = safe_torch_load(step_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")[
        "optimizer_state_dict"
    ]
    assert (
        "single_partition_of_fp32_groups" in optim
        and "zero_stage" not in optim
        and "loss_scaler" not in optim
    )
    assert sorted(bf16) == sorted(fp32) == list(range(1, STEPS + 1))
    for step in bf16:
        a, b = bf16[step], fp32[step]
        assert math.isfinite(a["loss"]) and math.isfinite(a["grad_norm"]), (step, a)
        assert abs(a["loss"] - b["loss"]) <= TOLERANCE, (step, a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.05), (
            step,
            a["grad_norm"],
            b["grad_norm"],
        )
    assert bf16[STEPS]["loss"] < 0.8 * bf16[1]["loss"]
    assert bf16[STEPS]["nonfinite_skips"] == 0


# ---------------------------------------------------------------------------------------------
# one two-rank world: every ZeRO stage and ep size on a real engine
# ---------------------------------------------------------------------------------------------

HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist", "numpy")


@contextlib.contextmanager
def host_reads_from(where: str):
    """Lists the host reads of tensors (`float(t)`, `if t:`, `.item()`, ...) made within the block
    by code in a file whose path contains `where` (a file, or a package directory)."""
    seen: list[str] = []
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def watch(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if where in caller.co_filename:
                seen.append(f"{name} in {caller.co_name}")
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, watch(name))
    try:
        yield seen
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)


def _engine(zero: int, ep: int, extra: list[str] = ()):
    """The trainer's setup (fusion.train.train) of configs/debug.yaml in bf16, without data."""
    import deepspeed

    from fusion.config import deepspeed_config, finalize, load_config
    from fusion.data.tokenizer import build_tokenizer
    from fusion.guard import NonFiniteGuard, innermost_optimizer
    from fusion.model.fusion import build_model
    from fusion.parallel import ExpertParallel
    from fusion.step import param_groups
    from fusion.train import init_distributed

    cfg = load_config(
        "configs/debug.yaml",
        [
            f"train.zero_stage={zero}",
            f"model.moe.ep_size={ep}",
            "train.grad_accum=2",
            "train.precision=bf16",
            "train.grad_clip=0",
            *extra,
        ],
    )
    _, world, device = init_distributed()
    finalize(cfg, world)
    torch.manual_seed(0)
    model = build_model(cfg.model, build_tokenizer("byte"))
    experts = ExpertParallel(model, ep)
    groups = param_groups(model, 0.1, cfg.model.vision)  # as the trainer builds them
    optimizer = torch.optim.AdamW([g for g in groups if g["name"] != "experts"], lr=1e-3, weight_decay=0.1)
    engine, _, _, _ = deepspeed.initialize(
        model=experts.engine_module(), optimizer=optimizer, config=deepspeed_config(cfg, world, True)
    )
    cast = {n: b.dtype for n, b in model.named_buffers() if n.endswith(("expert_bias", ".load"))}
    experts.attach(engine, [g for g in groups if g["name"] == "experts"], (0.9, 0.95), 0.0)
    restored = getattr(experts, "restore_buffer_dtypes", list)()
    guard = NonFiniteGuard(model, [innermost_optimizer(engine.optimizer), experts.optimizer], device)
    return model, experts, engine, guard, cast, restored


def _step(model, experts, engine, guard, coefs):
    """One optimizer step as train_step does it, of micro-steps whose loss is sum(c * p) over every
    parameter: each gradient element is c / grad_accum. -> (skipped, norm, the experts' reduced
    gradients, host reads in fusion/parallel/)."""
    for c in coefs:
        loss = sum((p.float() * c).sum() for p in model.parameters())
        guard.observe_loss(loss)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            with host_reads_from("fusion/parallel/") as reads:
                experts.reduce_grads()
            skipped = guard.decide()
            grads = [t.grad.clone() for t in getattr(experts, "accum", None) or experts.params]
            with guard.suppress(skipped), host_reads_from("fusion/parallel/") as more:
                engine.step()
                norm = experts.step()
        else:
            with guard.suppress(False):
                engine.step()
    return skipped, norm, grads, reads + more


def _state(model, experts, engine) -> dict[str, torch.Tensor]:
    """Weights, master weights and both optimizers' state, copied."""
    from fusion.guard import innermost_optimizer

    out = {f"w/{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"master/{i}": m.detach().clone() for i, (_, m) in enumerate(experts.masters)})
    for tag, opt in (("dense", innermost_optimizer(engine.optimizer)), ("experts", experts.optimizer)):
        for i, st in enumerate(opt.state.values()):
            for k, v in st.items():
                out[f"{tag}/{i}/{k}"] = torch.as_tensor(v).detach().clone()
    if hasattr(engine.optimizer, "fp32_groups"):  # the unfused wrapper's dense masters
        for i, hp in enumerate(p for g in engine.optimizer.fp32_groups for p in g):
            out[f"dense_master/{i}"] = hp.detach().clone()
    return out


def _probe(zero: int, ep: int) -> dict:
    from fusion import dist

    model, experts, engine, guard, cast, restored = _engine(zero, ep)
    result = {
        "wrapper": type(engine.optimizer).__name__,
        "mode": getattr(experts, "norm_mode", None),
        "buffers": sorted({str(d) for d in cast.values()}),
        "restored": restored,
    }
    n_dense = sum(p.numel() for p in engine.module.parameters())
    n_experts = sum(p.numel() for p in experts.params) * ep  # every shard
    share = 1.0 if ep == 1 else 1.0 / dist.world()  # ep 2 on 2 ranks: each expert's grads come from one rank

    def want(g):
        return g * math.sqrt(n_dense + share**2 * n_experts)

    skipped, norm, grads, reads = _step(model, experts, engine, guard, [1.0, 2.0**-10])
    result.update(
        first_skipped=skipped,
        norm=float(norm),
        norm_fp32=want(FP32_SUM),
        norm_bf16=want(BF16_SUM),
        norm_is_tensor=isinstance(norm, torch.Tensor),
        host_reads=reads,
        expert_grad_dtypes=sorted({str(g.dtype) for g in grads}),
        expert_grads=sorted({float(v) for g in grads for v in g.unique()}),
        expert_grad_fp32=FP32_SUM * share,
        bf16_grads_freed=all(p.grad is None for p in experts.params),
    )
    before = _state(model, experts, engine)
    skipped, norm, _, _ = _step(model, experts, engine, guard, [1.0, float("nan")])
    after = _state(model, experts, engine)
    result.update(
        nan_skipped=skipped, changed_by_skip=[k for k in before if not torch.equal(before[k], after[k])]
    )
    skipped, norm, _, _ = _step(model, experts, engine, guard, [1.0, 2.0**-10])
    result.update(after_skip_skipped=skipped, after_skip_norm=float(norm))
    return result


def _train(zero: int, ep: int, shards: str, run_dir: str) -> dict:
    """`fusion.train.train` of 5 bf16 steps; the engine and the experts it made are looked at after."""
    import deepspeed
    from safetensors.torch import load_file

    from fusion import parallel
    from fusion.config import load_config
    from fusion.train import train

    cfg = load_config(
        "configs/debug.yaml",
        [
            f"train.zero_stage={zero}",
            f"model.moe.ep_size={ep}",
            "train.grad_accum=2",
            "train.precision=bf16",
            "train.seq_len=64",
            "train.micro_batch=4",
            "train.warmup=2",
            f"train.steps={TRAIN_STEPS}",
            "train.ckpt_every=0",
            "data.num_workers=0",
            "data.shuffle_buffer=32",
            "model.moe.balance=bias",
            f"data.text={shards}",
            f"run.dir={run_dir}",
        ],
    )
    made = {}
    initialize, attach = deepspeed.initialize, parallel.ExpertParallel.attach

    def initialize_and_keep(*args, **kwargs):
        out = initialize(*args, **kwargs)
        made["engine"] = out[0]
        return out

    def attach_and_keep(self, *args, **kwargs):
        made["experts"] = self
        return attach(self, *args, **kwargs)

    deepspeed.initialize, parallel.ExpertParallel.attach = initialize_and_keep, attach_and_keep
    try:
        assert train(cfg) == 0
    finally:
        deepspeed.initialize, parallel.ExpertParallel.attach = initialize, attach
    engine, experts = made["engine"], made["experts"]
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    saved = load_file(f"{run_dir}/checkpoints/step_{TRAIN_STEPS}/model.safetensors")
    bias = saved["decoder.layers.0.moe.router.expert_bias"]
    accum = getattr(experts, "accum", [])
    return {
        "losses": [r["loss"] for r in rows if "loss" in r],
        "bias_dtype": str(bias.dtype),
        "bias_beyond_bf16": bool((bias.to(torch.bfloat16).float() != bias).any()),
        # DeepSpeed's own fp32 accumulation (ZeRO 1/2), or fusion.parallel's (no ZeRO)
        "dense_fp32": engine.get_data_types()[1] == torch.float32
        or getattr(experts, "norm_mode", None) == "unfused",
        "experts_fp32": bool(accum) and all(t.dtype == torch.float32 for t in accum),
    }


def _world(rank: int, port: int, out_dir: str, shards: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    results: dict = {}
    for zero, ep in CONFIGS:
        try:
            results[f"probe/{zero}/{ep}"] = _probe(zero, ep)
        except Exception:
            results[f"probe/{zero}/{ep}"] = {"error": traceback.format_exc()}
    try:  # the engine told to cast buffers too (DeepSpeed's data_types.buffer_dtype)
        *_, cast, restored = _engine(1, 2, ['train.deepspeed={"data_types": {"buffer_dtype": "bf16"}}'])
        results["cast_buffers"] = {"cast": sorted({str(d) for d in cast.values()}), "restored": restored}
    except Exception:
        results["cast_buffers"] = {"error": traceback.format_exc()}
    for zero, ep in CONFIGS:
        try:
            results[f"train/{zero}/{ep}"] = _train(zero, ep, shards, f"{out_dir}/run_{zero}_{ep}")
        except Exception:
            results[f"train/{zero}/{ep}"] = {"error": traceback.format_exc()}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def world(text_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_world")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_world, args=(r, port, str(out), str(text_shards))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _results(world, key):
    for rank, results in enumerate(world):
        assert "error" not in results[key], f"rank {rank} {key}:\n{results[key].get('error')}"
        yield rank, results[key]


@pytest.mark.parametrize("zero,ep", CONFIGS)
def test_gradients_accumulate_and_reduce_in_fp32(world, zero, ep):
    for rank, r in _results(world, f"probe/{zero}/{ep}"):
        assert r["wrapper"] == WRAPPER[zero]
        assert not r["first_skipped"]
        # the global norm (dense and experts) is that of the fp32 sums, not of the bf16 ones
        assert r["norm"] == pytest.approx(r["norm_fp32"], rel=1e-5), (
            rank,
            r["norm"],
            r["norm_fp32"],
            r["norm_bf16"],
        )
        # the experts: fp32 gradients (the bf16 ones freed), each element the fp32 sum
        assert r["expert_grad_dtypes"] == ["torch.float32"] and r["bf16_grads_freed"], (rank, r)
        assert r["expert_grads"] == [r["expert_grad_fp32"]], (rank, r["expert_grads"])


@pytest.mark.parametrize("zero,ep", CONFIGS)
def test_expert_step_is_sync_free_and_a_skipped_step_changes_nothing(world, zero, ep):
    for rank, r in _results(world, f"probe/{zero}/{ep}"):
        assert r["host_reads"] == [] and r["norm_is_tensor"], (rank, r["host_reads"])
        assert r["nan_skipped"] and r["changed_by_skip"] == [], (rank, r["changed_by_skip"][:5])
        assert not r["after_skip_skipped"]
        assert r["after_skip_norm"] == pytest.approx(r["norm_fp32"], rel=1e-5), (rank, r["after_skip_norm"])


def test_moe_buffers_keep_their_dtypes(world):
    for rank, r in _results(world, "probe/1/2"):
        # DeepSpeed 0.19.8 in bf16 casts parameters only: nothing to restore
        assert r["buffers"] == ["torch.float32", "torch.float64"] and r["restored"] == [], (rank, r)
    for rank, r in _results(world, "cast_buffers"):
        # told to cast buffers (data_types.buffer_dtype=bf16), it does; restore_buffer_dtypes undoes it
        assert r["cast"] == ["torch.bfloat16"], (rank, r)
        assert sorted(r["restored"]) == sorted(
            f"decoder.layers.{i}.moe.{b}" for i in (0, 1) for b in ("router.expert_bias", "load")
        ), (rank, r)


@pytest.mark.parametrize("zero,ep", CONFIGS)
def test_every_zero_stage_and_ep_size_trains_in_bf16(world, zero, ep):
    """Finite, falling losses, with fp32 gradient accumulation for the dense part and the experts,
    and the same as at ZeRO 1 with ep_size 1: measured within 2e-4 of each other over 5 steps
    (ZeRO 0 is 0.03 off at step 2 if its wrapper's AdamW step at init is not undone)."""
    ref = world[0]["train/1/1"]["losses"]
    for _rank, r in _results(world, f"train/{zero}/{ep}"):
        losses = r["losses"]
        assert len(losses) == TRAIN_STEPS and all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0] - 0.2, losses
        assert r["dense_fp32"] and r["experts_fp32"], r
        assert losses == pytest.approx(ref, abs=2e-3), (losses, ref)
        # the router bias is saved in fp32, holding values bf16 could not
        assert r["bias_dtype"] == "torch.float32" and r["bias_beyond_bf16"], r
