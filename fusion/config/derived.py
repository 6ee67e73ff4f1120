"""Values derived from a loaded config, computed once (`finalize`), and the DeepSpeed JSON generated
from it (`deepspeed_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion.config.fields import Config, ConfigError, MoEConfig
from fusion.config.load import merge
from fusion.schema import tokens_per_image, tokens_per_video


def moe_layer_ids(n_layers: int, every: int, n_experts: int) -> list[int]:
    """Llama 4 interleave: layers every-1, 2*every-1, ... are MoE (every=1: all of them)."""
    if n_experts == 0:
        return []
    return list(range(every - 1, n_layers, every))


def dense_baseline_ffn_dim(moe: MoEConfig) -> int:
    """Width of the dense SwiGLU that replaces an MoE layer under `model.dense_baseline`: the hidden
    width one token activates there, top_k routed + n_shared shared experts (the router's E x D gate
    has no dense counterpart)."""
    return (moe.top_k + moe.n_shared) * moe.moe_ffn_dim


@dataclass
class Derived:
    world_size: int
    dp_size: int  # data-parallel ranks (all ranks: experts shard inside them)
    global_batch: int  # sequences per optimizer step over all ranks
    tokens_per_step: int
    head_dim: int
    moe_layers: list[int]
    image_tokens: int  # sequence tokens of one image, markers included
    video_tokens: int  # sequence tokens of one video of data.n_frames frames


def finalize(cfg: Config, world_size: int) -> Derived:
    """Every derived value, computed once, with assertions that say what broke."""
    m, t = cfg.model, cfg.train
    if m.moe.ep_size > 1 and world_size % m.moe.ep_size:
        raise ConfigError(
            f"config key 'model.moe.ep_size': world size {world_size} is not divisible "
            f"by ep_size={m.moe.ep_size}"
        )
    image_tokens = tokens_per_image(m.vision) + 2
    video_tokens = tokens_per_video(m.vision, cfg.data.n_frames)
    global_batch = t.micro_batch * t.grad_accum * world_size
    assert global_batch == t.micro_batch * t.grad_accum * world_size, (
        "micro_batch * grad_accum * world must equal global_batch"
    )
    return Derived(
        world_size=world_size,
        dp_size=world_size,
        global_batch=global_batch,
        tokens_per_step=global_batch * t.seq_len,
        head_dim=m.dim // m.n_heads,
        moe_layers=[] if m.dense_baseline else moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts),
        image_tokens=image_tokens,
        video_tokens=video_tokens,
    )


def deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON, generated from the training config; `train.deepspeed` keys merge on top."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # gradients summed over micro-steps and reduced between ranks in fp32 (DeepSpeed's bf16
        # default does both in bf16). ZeRO 1 then runs DeepSpeed's BF16_Optimizer, ZeRO 2 its ZeRO
        # optimizer with fp32 gradient partitions. BF16_Optimizer adds each bf16 gradient into its
        # fp32 buffer as backward produces it (immediate_grad_update): its other way clears the bf16
        # gradients in a backward prologue that DeepSpeed 0.19.8 hooks onto the forward's output
        # tensors, and it finds none in the model's output dataclass, so every micro-step would add
        # the earlier ones again. Without ZeRO, DeepSpeed 0.19.8 refuses fp32 accumulation
        # ("unsupported mix of model_dtype and grad_accum_dtype"): fusion.parallel.ExpertParallel
        # .attach accumulates those gradients in fp32 itself.
        ds["bf16"]["immediate_grad_update"] = True
        if t.zero_stage > 0:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    return merge(ds, t.deepspeed)
