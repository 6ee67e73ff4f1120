"""fusion-plan: parameters, training FLOPs per token and memory per GPU of a config, from the config alone.

    fusion-plan --config configs/small.yaml --world 8 --micro-batch 8
    fusion-plan model.size=llama4-scout train.seq_len=8192 --world 64 --ep-size 16 --json

Parameters, split by part (each equals the built model's `named_parameters` of that part; a tied
output head counts once):
    embeddings      token embeddings, output head, final norm
    attention       wq, wk, wv, wo and the attention norm of every layer
    dense_ffn       SwiGLU w1, w3 (ffn_dim wide), w2 and the FFN norm of dense layers
    router          router gate (E x D) and the FFN norm of MoE layers
    shared_experts  the n_shared always-on experts of MoE layers (n_shared * moe_ffn_dim wide)
    routed_experts  the E routed experts of MoE layers (moe_ffn_dim wide each)
    vision          encoder, projector and frame positions
    cross_attention late fusion's gated cross-attention blocks (model.fusion=late; 0 otherwise)
Active parameters (per token): all of them except routed experts, of which top_k / E count.
With model.dense_baseline the MoE layers are dense SwiGLUs of (top_k + n_shared) * moe_ffn_dim,
counted under dense_ffn: the same active parameters as the MoE model except the router's E x D
gate, which has no dense counterpart.

Training FLOPs per decoder token (forward + backward = 3 x forward; the vision encoder excluded):

    6 * N + 6 * sum over layers of (n_heads * head_dim * ctx)

N is the active matmul parameters (attention, dense FFN, router, shared experts, top_k / E of the
routed experts, the output head; not the embedding lookup or norms). The attention scores QK^T and
the weighted sum AV cost 2 * n_heads * head_dim FLOPs per (query, key) each in forward; a causal
query sees ctx / 2 keys on average, with ctx = seq_len on full-attention layers and
min(attn_chunk, seq_len) on chunked ones: 3 * 2 * 2 * n_heads * head_dim * ctx / 2.
Late fusion adds its cross-attention blocks' matmul parameters to N and, per block, the scores
against one image's placeholder tokens P (no causal halving): 3 * 2 * 2 * n_heads * head_dim * P.
Every sequence token is counted as a decoder token; under late fusion the placeholders skip the
decoder, so this is an upper bound of a late-fusion model's cost on media-heavy rows.

Memory per GPU, for ZeRO stages 0-3 on `world` ranks with experts sharded over `ep_size` of them
(bytes per parameter: bf16 2 weights + 2 grads + 12 fp32 Adam (master, m, v); fp32 4 + 4 + 8;
under train.optimizer=muon the matrices it steps keep one fp32 momentum instead of Adam's m and v):
stage 1 splits optimizer states over the data-parallel ranks, 2 also gradients, 3 also weights.
Routed experts are trained beside DeepSpeed, outside ZeRO (fusion/parallel/): a rank holds the
weights, gradients and optimizer state of its n_experts / ep_size local experts at every stage.
Activations
are an estimate of what autograd keeps per micro-batch (see `activation_bytes`), with and without
activation checkpointing of every layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from fusion.config import (
    Config,
    ConfigError,
    ModelConfig,
    VisionConfig,
    dense_baseline_ffn_dim,
    load_config,
    moe_layer_ids,
)
from fusion.model.decoder import uses_rope
from fusion.schema import tokens_per_image

PARTS = (
    "embeddings",
    "attention",
    "dense_ffn",
    "router",
    "shared_experts",
    "routed_experts",
    "vision",
    "cross_attention",
)
GiB = 1024**3


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------


def part_of(name: str, moe_layers: set[int]) -> str:
    """The part a FusionModel parameter belongs to, by its name (the split `count_parameters` counts)."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("late."):
        return "cross_attention"
    if ".moe.experts." in name:
        return "routed_experts"
    if ".moe.shared." in name:
        return "shared_experts"
    if ".moe.router." in name:
        return "router"
    if ".attn." in name or name.endswith(".attn_norm.weight"):
        return "attention"
    if ".ffn." in name:
        return "dense_ffn"
    if name.endswith(".ffn_norm.weight"):  # decoder.layers.{i}.ffn_norm.weight
        return "router" if int(name.split(".")[2]) in moe_layers else "dense_ffn"
    return "embeddings"  # tok_embeddings, output, final norm


def count_parameters_of(model) -> dict[str, int]:
    """The built model's parameters by part (what `count_parameters` must equal)."""
    moe_layers = {b.layer_id for b in model.decoder.layers if b.moe is not None}
    out = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        out[part_of(name, moe_layers)] += p.numel()
    return out


def vision_parameters(v: VisionConfig, dim: int) -> int:
    """Encoder + projector + frame positions of fusion/model/vision.py's VisionTower."""
    if v.encoder == "patch-linear":
        width = v.width or dim
        n_patches = (v.img_size // v.patch_size) ** 2
        encoder = (3 * v.patch_size**2 + 1) * width + n_patches * width  # Linear + bias, positions
    elif v.encoder == "conv-stem":
        from fusion.model.vision import conv_stem_channels

        width = v.width or dim
        channels = conv_stem_channels(v.patch_size, width)
        encoder = sum((9 * c_in + 1) * c_out for c_in, c_out in zip([3] + channels[:-1], channels))
        encoder += (v.img_size // v.patch_size) ** 2 * width  # positions
    else:
        vit = meta_timm_vit(v)
        encoder, width = sum(p.numel() for p in vit.parameters()), vit.num_features
    frame_pos = (v.max_frames // v.temporal_merge) * dim if v.frame_pos else 0
    return encoder + projector_parameters(v, width, dim) + frame_pos


def meta_timm_vit(v: VisionConfig):
    """A timm ViT's modules on the meta device (no memory, no weights): its shapes, to count."""
    import torch

    from fusion.model.vision import create_timm_vit

    with torch.device("meta"):
        return create_timm_vit(v.encoder, v.img_size, v.patch_size)


def projector_parameters(v: VisionConfig, width: int, dim: int) -> int:
    """The projector's fc1, fc2 and proj (no biases) from an encoder of `width` features."""
    channels = width * (4 if v.pixel_shuffle else 1) * v.temporal_merge
    return channels * dim + dim * dim + dim * dim


def n_moe_layers(m: ModelConfig) -> int:
    """MoE layers the built model has (none under model.dense_baseline)."""
    return 0 if m.dense_baseline else len(moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts))


def n_xattn_blocks(m: ModelConfig) -> int:
    """Late fusion's cross-attention blocks: before layers 0, k, 2k, ... (fusion/model/late.py)."""
    return len(range(0, m.n_layers, m.xattn_every)) if m.fusion == "late" else 0


def count_parameters(m: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Parameters by part, from the config alone."""
    D, L, E = m.dim, m.n_layers, m.moe.n_experts
    head_dim = D // m.n_heads
    n_replaced = len(moe_layer_ids(L, m.moe.every, E)) if m.dense_baseline else 0
    n_moe = n_moe_layers(m)
    n_dense = L - n_moe - n_replaced
    attn = D * m.n_heads * head_dim * 2 + D * m.n_kv_heads * head_dim * 2 + D  # wq, wo, wk, wv, norm
    swiglu = 3 * D  # per unit of hidden width
    # a gated xattn-dense block: attention + FFN (ffn_dim) + attention, media and FFN norms + 2 gates
    xattn = (attn - D) + swiglu * m.ffn_dim + 3 * D + 2
    return {
        "embeddings": vocab_size * D * (1 if m.tie_embeddings else 2) + D,
        "attention": L * attn,
        "dense_ffn": n_dense * (swiglu * m.ffn_dim + D)
        + n_replaced * (swiglu * dense_baseline_ffn_dim(m.moe) + D),
        "router": n_moe * (E * D + D),
        "shared_experts": n_moe * swiglu * m.moe.n_shared * m.moe.moe_ffn_dim,
        "routed_experts": n_moe * E * swiglu * m.moe.moe_ffn_dim,
        "vision": vision_parameters(m.vision, D),
        "cross_attention": n_xattn_blocks(m) * xattn,
    }


def vision_matrices(v: VisionConfig, dim: int) -> int:
    """The vision tower's weights `train.optimizer=muon` steps (fusion/step.py `muon_matrices`): the
    projector's three linear layers and a timm ViT's linear layers; not a patch embedding (it reads
    pixels), convolutions or positions."""
    if v.encoder in ("patch-linear", "conv-stem"):
        return projector_parameters(v, v.width or dim, dim)
    import torch

    vit = meta_timm_vit(v)
    encoder = sum(m.weight.numel() for m in vit.modules() if isinstance(m, torch.nn.Linear))
    return encoder + projector_parameters(v, vit.num_features, dim)


def muon_parameters(m: ModelConfig, vocab_size: int, experts: bool = True) -> dict[str, int]:
    """Parameters by part that `train.optimizer=muon` steps (the hidden matrices; the routed experts
    with `train.muon_experts`); AdamW steps the rest of `count_parameters`."""
    D, L = m.dim, m.n_layers
    total = count_parameters(m, vocab_size)
    out = dict.fromkeys(PARTS, 0)
    out["attention"] = total["attention"] - L * D  # less the norms
    out["dense_ffn"] = total["dense_ffn"] - (L - n_moe_layers(m)) * D  # less a norm per dense FFN
    out["shared_experts"] = total["shared_experts"]
    out["routed_experts"] = total["routed_experts"] if experts else 0
    out["vision"] = vision_matrices(m.vision, D)
    # a cross-attention block: its attention's and FFN's matrices, not its 3 norms and 2 gates
    out["cross_attention"] = total["cross_attention"] - n_xattn_blocks(m) * (3 * D + 2)
    return out


def active_parameters(m: ModelConfig, vocab_size: int) -> dict[str, int]:
    total = count_parameters(m, vocab_size)
    active = dict(total)
    if m.moe.n_experts and not m.dense_baseline:
        active["routed_experts"] = total["routed_experts"] * m.moe.top_k // m.moe.n_experts
    return active


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def matmul_parameters(m: ModelConfig, vocab_size: int) -> float:
    """Active parameters that take part in a matmul per decoder token (no lookup, norms, vision)."""
    a = active_parameters(m, vocab_size)
    n_moe = n_moe_layers(m)
    n_dense = m.n_layers - n_moe
    n_x = n_xattn_blocks(m)
    return (
        a["attention"]
        - m.n_layers * m.dim
        + a["dense_ffn"]
        - n_dense * m.dim
        + a["router"]
        - n_moe * m.dim
        + a["shared_experts"]
        + a["routed_experts"]
        + a["cross_attention"]
        - n_x * (3 * m.dim + 2)  # norms and gates do not multiply
        + vocab_size * m.dim
    )  # the output head (tied or not, it multiplies)


def attention_context(m: ModelConfig, seq_len: int) -> list[int]:
    """Per layer: keys a query could see at most (seq_len, or the chunk on chunked RoPE layers)."""
    return [
        min(m.attn_chunk, seq_len) if m.attn_chunk and uses_rope(i, m.nope_every) else seq_len
        for i in range(m.n_layers)
    ]


def flops_per_token(m: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per decoder token: 6 * N_matmul + 6 * sum_l(n_heads * head_dim * ctx_l)."""
    return 6 * matmul_parameters(m, vocab_size) + attention_flops(m, seq_len)


def attention_flops(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of attention scores: causal self-attention on every layer, plus
    late fusion's cross-attention to one image's placeholder tokens per block."""
    head_dim = m.dim // m.n_heads
    attn = 6 * m.n_heads * head_dim * sum(attention_context(m, seq_len))
    return attn + 12 * m.n_heads * head_dim * tokens_per_image(m.vision) * n_xattn_blocks(m)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


@dataclass
class Precision:
    name: str
    weight: int  # bytes per weight
    grad: int  # bytes per gradient
    optimizer: int  # bytes per parameter of AdamW state (fp32 master + Adam m, v for bf16)
    activation: int  # bytes per activation element
    muon: int  # bytes per parameter Muon steps (fp32 master for bf16 + one momentum buffer)


PRECISIONS = {"bf16": Precision("bf16", 2, 2, 12, 2, 8), "fp32": Precision("fp32", 4, 4, 8, 4, 4)}


def activation_bytes(
    m: ModelConfig, vocab_size: int, micro_batch: int, seq_len: int, prec: Precision, checkpointing: bool
) -> float:
    """What autograd keeps for one micro-batch (an estimate; elements per token, times bytes):

    attention layer  4 D + 4 Dkv   input, normed input, q, k, v (+ rotated q, k), output
    dense FFN        2 D + 4 F     input, normed input, gate, up, silu(gate), product
    MoE FFN          2 D + 3 K D + 4 K H + 4 S H + 2 E   input, normed input; per routed copy the
                     gathered, gated and output rows and 4 hidden tensors; the shared experts';
                     fp32 router logits
    output           V (logits) + 4 V / bytes (their fp32 copy for the loss)
    masks            T bytes per token for each of the full and chunked (B, 1, T, T) masks
    With checkpointing of every layer only each layer's input (D) stays, plus one layer's full set
    while it is recomputed.
    """
    D, K, E = m.dim, m.moe.top_k, m.moe.n_experts
    H, S = m.moe.moe_ffn_dim, m.moe.n_shared
    dkv = m.n_kv_heads * (D // m.n_heads)
    moe_ids = set(moe_layer_ids(m.n_layers, m.moe.every, E))
    attn = 4 * D + 4 * dkv
    if m.dense_baseline:
        per_layer = [
            attn + 2 * D + 4 * (dense_baseline_ffn_dim(m.moe) if i in moe_ids else m.ffn_dim)
            for i in range(m.n_layers)
        ]
    else:
        per_layer = [
            attn
            + (2 * D + 3 * K * D + 4 * K * H + 4 * S * H + 2 * E if i in moe_ids else 2 * D + 4 * m.ffn_dim)
            for i in range(m.n_layers)
        ]
    # late fusion: each cross-attention block keeps about what a dense layer does
    per_layer += [attn + 2 * D + 4 * m.ffn_dim] * n_xattn_blocks(m)
    layers = (len(per_layer) * D + max(per_layer)) if checkpointing else sum(per_layer)
    output = vocab_size * (1 + 4 / prec.activation)
    tokens = micro_batch * seq_len
    n_masks = 1 + (1 if m.attn_chunk and any(uses_rope(i, m.nope_every) for i in range(m.n_layers)) else 0)
    masks = n_masks * micro_batch * seq_len * seq_len  # bool
    return tokens * (layers + output) * prec.activation + masks


def memory_per_gpu(
    m: ModelConfig,
    vocab_size: int,
    world: int,
    ep_size: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    optimizer: str = "adamw",
    muon_experts: bool = True,
) -> dict:
    """Bytes per GPU by ZeRO stage: weights, grads, optimizer, activations (with / without
    per-layer activation checkpointing) and the totals. With `optimizer="muon"` the matrices Muon
    steps keep one momentum buffer instead of Adam's two; Muon runs at ZeRO 0 only, so stages 1-3
    show AdamW's state (the optimizer they would train with)."""
    prec = PRECISIONS[precision]
    total = count_parameters(m, vocab_size)
    experts = total["routed_experts"]
    replicated = sum(total.values()) - experts
    local_experts = experts / ep_size
    muon = muon_parameters(m, vocab_size, muon_experts) if optimizer == "muon" else dict.fromkeys(PARTS, 0)
    muon_local_experts = muon["routed_experts"] / ep_size
    muon_replicated = sum(muon.values()) - muon["routed_experts"]
    # stage 0 under Muon: every parameter on AdamW's bytes, less what Muon saves on its matrices
    muon_saving = (muon_replicated + muon_local_experts) * (prec.optimizer - prec.muon)
    dp = world  # ranks that share a replicated parameter
    act = activation_bytes(m, vocab_size, micro_batch, seq_len, prec, checkpointing=False)
    act_ckpt = activation_bytes(m, vocab_size, micro_batch, seq_len, prec, checkpointing=True)
    stages = {}
    for stage in range(4):

        def held(split_at: int, stage: int = stage) -> float:  # parameters of one kind a rank holds
            # ZeRO partitions only what DeepSpeed holds; the local experts are whole on every stage
            return (replicated / dp if stage >= split_at else replicated) + local_experts

        row = {
            "weights": held(3) * prec.weight,
            "grads": held(2) * prec.grad,
            "optimizer": held(1) * prec.optimizer - (muon_saving if stage == 0 else 0),
            "activations": act,
            "activations_ckpt": act_ckpt,
        }
        states = row["weights"] + row["grads"] + row["optimizer"]
        row["total"] = states + act
        row["total_ckpt"] = states + act_ckpt
        stages[stage] = row
    return stages


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


def vocab_of(cfg: Config) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from fusion.data.tokenizer import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer).vocab_size


def make_plan(
    cfg: Config, world: int = 1, micro_batch: int | None = None, ep_size: int | None = None
) -> dict:
    m = cfg.model
    micro_batch = micro_batch or cfg.train.micro_batch
    ep_size = ep_size or m.moe.ep_size
    if world < 1 or micro_batch < 1 or ep_size < 1:
        raise ConfigError(
            f"--world, --micro-batch and --ep-size must be >= 1, got {world}, {micro_batch}, {ep_size}"
        )
    if world % ep_size:
        raise ConfigError(f"--ep-size {ep_size} does not divide --world {world}")
    if m.moe.n_experts and m.moe.n_experts % ep_size:
        raise ConfigError(f"--ep-size {ep_size} does not divide model.moe.n_experts={m.moe.n_experts}")
    vocab = vocab_of(cfg)
    total, active = count_parameters(m, vocab), active_parameters(m, vocab)
    precision = "fp32" if cfg.train.precision == "fp32" else "bf16"  # auto: bf16 on a GPU
    seq = cfg.train.seq_len
    return {
        "size": m.size,
        "vocab_size": vocab,
        "params": {
            "total": {**total, "total": sum(total.values())},
            "active": {**active, "total": sum(active.values())},
        },
        "flops_per_token": flops_per_token(m, vocab, seq),
        "matmul_params": matmul_parameters(m, vocab),
        "seq_len": seq,
        "memory": {
            "world": world,
            "ep_size": ep_size,
            "micro_batch": micro_batch,
            "precision": precision,
            "optimizer": cfg.train.optimizer,
            "bytes": memory_per_gpu(
                m,
                vocab,
                world,
                ep_size,
                micro_batch,
                seq,
                precision,
                cfg.train.optimizer,
                cfg.train.muon_experts,
            ),
        },
    }


def _b(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def format_plan(plan: dict, cfg: Config) -> str:
    m = cfg.model
    moe = m.moe
    lines = [
        f"fusion-plan: model.size={plan['size']}: dim {m.dim}, {m.n_layers} layers, "
        f"{m.n_heads}/{m.n_kv_heads} heads, vocab {plan['vocab_size']}, "
        + (
            f"{moe.n_experts} experts (top-{moe.top_k} + {moe.n_shared} shared) every {moe.every} layer(s)"
            if moe.n_experts and not m.dense_baseline
            else "dense"
        )
        + (
            f" (dense baseline: MoE layers are {dense_baseline_ffn_dim(moe)}-wide SwiGLUs)"
            if m.dense_baseline
            else ""
        )
        + (
            f", late fusion: cross-attention before every {m.xattn_every} layer(s)"
            if m.fusion == "late"
            else ""
        ),
        "",
        f"{'parameters':<18}{'total':>14}{'active':>14}",
    ]
    t, a = plan["params"]["total"], plan["params"]["active"]
    for part in PARTS + ("total",):
        lines.append(f"  {part:<16}{_b(t[part]):>14}{_b(a[part]):>14}")
    attn = attention_flops(m, plan["seq_len"])
    lines += [
        "",
        f"training FLOPs per token: {plan['flops_per_token']:.3e} = 6 x {_b(plan['matmul_params'])} "
        f"matmul params + {attn:.3e} attention (seq_len {plan['seq_len']}"
        + (f", {m.attn_chunk}-token chunks" if m.attn_chunk else "")
        + ")",
        "",
    ]
    mem = plan["memory"]
    lines.append(
        f"memory per GPU (GiB): world {mem['world']}, ep_size {mem['ep_size']}, micro-batch "
        f"{mem['micro_batch']}, seq_len {plan['seq_len']}, {mem['precision']}"
        + (" weights + fp32 Adam" if mem["precision"] == "bf16" else " weights + Adam")
        + (", Muon's one momentum for its matrices at ZeRO 0" if mem["optimizer"] == "muon" else "")
    )
    cols = ("weights", "grads", "optimizer", "activations", "activations_ckpt", "total", "total_ckpt")
    heads = ("weights", "grads", "optim", "activ", "activ/ckpt", "total", "total/ckpt")
    lines.append("  ZeRO" + "".join(f"{h:>11}" for h in heads))
    for stage, row in mem["bytes"].items():
        lines.append(f"  {stage:>4}" + "".join(f"{row[c] / GiB:>11.2f}" for c in cols))
    if mem["optimizer"] == "muon":
        lines.append("  (train.optimizer=muon trains at ZeRO 0 only: stages 1-3 show AdamW's state)")
    if n_moe_layers(m):
        lines.append(
            "  (routed experts are outside ZeRO: each rank holds its local experts whole at every stage)"
        )
        lines.append("  (stage 3 is listed for comparison: fusion trains MoE models with ZeRO 0-2)")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fusion-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of overrides (see configs/); defaults otherwise")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, applied after the YAML file (e.g. model.size=llama4-scout)",
    )
    p.add_argument("--world", type=int, default=1, help="number of GPUs (ranks) in total (default 1)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per GPU per micro-step (default: train.micro_batch)",
    )
    p.add_argument(
        "--ep-size",
        type=int,
        default=None,
        help="ranks that share one MoE layer's experts (default: model.moe.ep_size)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the plan as JSON (bytes, counts) instead of a table"
    )
    return p.parse_intermixed_args(argv)  # options may follow overrides


def main(argv=None) -> int:
    from fusion.cli import pipe_safe

    return pipe_safe(lambda: _main(argv))  # `fusion-plan ... | head`: no traceback


def _main(argv) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg, args.world, args.micro_batch, args.ep_size)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"fusion-plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
