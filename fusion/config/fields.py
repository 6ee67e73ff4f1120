"""The configuration's typed dataclasses: every key, its type, its default and what it means.
Defaults are a run that works on a laptop; YAML files in configs/ hold only overrides."""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and its source."""


# ---------------------------------------------------------------------------------------------
# dataclasses
# ---------------------------------------------------------------------------------------------


@dataclass
class MoEConfig:
    n_experts: int = 4  # routed experts per MoE layer (0 = every layer dense)
    top_k: int = 1  # routed experts per token
    n_shared: int = 1  # always-on shared experts, each moe_ffn_dim wide
    every: int = 1  # MoE layers are layers every-1, 2*every-1, ... (Llama 4 interleave)
    moe_ffn_dim: int = 128  # hidden width of one routed / shared expert
    score: str = "sigmoid"  # "sigmoid" (Llama 4: top-k on logits, sigmoid of chosen) | "softmax"
    gate_on: str = "input"  # where the routing score multiplies: expert "input" (Llama 4) | "output"
    norm_topk: bool = False  # softmax only: renormalise the K chosen probabilities to sum 1
    balance: str = "bias"  # "aux" (Switch aux loss) | "bias" (DeepSeek-V3 aux-free) | "none"
    aux_coef: float = 1e-2  # weight of the Switch load-balancing loss (balance=aux)
    z_coef: float = 1e-3  # weight of the router z-loss (any balance mode; 0 disables)
    bias_rate: float = 1e-3  # aux-free bias update step per optimizer step (balance=bias)
    path: str = "grouped"  # expert compute: "loop" (reference) | "grouped" (fast / batched) | "fast" (no host sync; GPU)
    ep_size: int = 1  # expert-parallel degree: each layer's experts are split over this many ranks
    n_groups: int = 1  # group-limited routing: experts form n_groups contiguous groups (1 = off)
    topk_groups: int = 1  # ... and each token picks its top_k experts inside its best topk_groups groups


@dataclass
class VisionConfig:
    encoder: str = "patch-linear"  # a timm ViT name, "patch-linear" (Fuyu-style, no ViT) or
    #   "conv-stem" (strided 3x3 convolutions, total stride patch_size)
    img_size: int = 32  # square side the loader crops and resizes media to (pixels)
    patch_size: int = 8  # pixels per patch side: (img_size / patch_size)^2 tokens per image
    width: int = 0  # patch-linear / conv-stem output width; 0 = the decoder dim
    pixel_shuffle: bool = False  # Llama 4 pixel-shuffle (ratio 0.5: 4x fewer tokens, 4x channels)
    temporal_merge: int = 1  # video: features of k consecutive frames merged into one group
    max_frames: int = 32  # size of the learned frame-position table
    frame_pos: bool = True  # learned frame-position embedding on every video frame's tokens
    checkpoint: str = ""  # local weights file for the timm model; never a hub download
    freeze: bool = False  # freeze the encoder (the projector still trains)
    lr_scale: float = 1.0  # vision tower learning rate = train.lr * lr_scale
    encoder_lr_scale: float = 0.0  # the encoder's own learning rate = train.lr * encoder_lr_scale;
    #   0 = lr_scale (the projector and frame positions keep lr_scale)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel pixel mean (0..1)
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel pixel std


@dataclass
class ModelConfig:
    size: str = "debug"  # a named size from SIZES; explicit keys override it
    vocab_size: int = 0  # 0 = taken from the tokenizer
    dim: int = 64  # model width (embedding and residual stream)
    n_layers: int = 2  # decoder layers
    n_heads: int = 4  # query heads (head dim = dim / n_heads, even for RoPE)
    n_kv_heads: int = 2  # key/value heads (grouped-query attention; divides n_heads)
    ffn_dim: int = 256  # width of the dense SwiGLU layers
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    tie_embeddings: bool = False  # share the token embeddings with the output head
    init_std: float = 0.02  # std of the weight init; residual-stream outputs / sqrt(2 n_layers);
    #   ~1/sqrt(dim) for narrow models

    # Llama 4 attention (README: Llama 4 model options); the defaults: plain RoPE, full causal attention
    nope_every: int = 0  # layers nope_every-1, 2*nope_every-1, ... use no RoPE and full causal
    #   attention over the document (NoPE); 0 = RoPE on every layer
    attn_chunk: int = 0  # RoPE layers attend only inside their attn_chunk-token chunk of the
    #   document (chunked local attention); 0 = full causal attention
    qk_norm: bool = False  # weightless L2 (RMS) norm of queries and keys on RoPE layers
    temp_tuning: bool = True  # NoPE layers scale queries by 1 + attn_scale * log1p(floor((pos + 1)
    #   / floor_scale))
    floor_scale: int = 8192  # positions per step of the NoPE temperature (tokens)
    attn_scale: float = 0.1  # slope of the NoPE temperature
    rope_factor: float = 1.0  # Llama 3 RoPE frequency scaling for long context; 1 = unscaled
    rope_low_freq_factor: float = 1.0  # wavelengths above rope_original_ctx / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # wavelengths below rope_original_ctx / this are kept;
    #   between: blended
    rope_original_ctx: int = 8192  # context length the unscaled RoPE was trained for (tokens)
    attn_impl: str = "sdpa"  # packed-sequence attention: "sdpa" (dense T x T bool mask, the reference)
    #   | "flex" (FlexAttention block masks, no dense mask; compiled on CUDA)
    # research switches (README: Research switches)
    fusion: str = "early"  # "early": media embeddings spliced into the token stream | "late":
    #   the decoder sees text only, media enter by gated cross-attention
    xattn_every: int = 1  # late fusion: a gated cross-attention block before layers 0, k, 2k, ...
    dense_baseline: bool = False  # every MoE layer becomes a dense SwiGLU of the same active width:
    #   (top_k + n_shared) * moe_ffn_dim (router excluded)
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)


@dataclass
class DataConfig:
    text: str = ""  # shard directory, brace pattern or URL list per modality
    image: str = ""  # image-caption (or vqa) shards
    video: str = ""  # video-caption (or vqa) shards
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # text, image, video
    alpha: float = 0.0  # temperature exponent on dataset sizes: p ~ w * n^alpha
    tokenizer: str = "byte"  # "byte", or a local Hugging Face tokenizer.json
    num_workers: int = 1  # DataLoader worker processes per rank and modality
    shuffle_buffer: int = 256  # samples held for shuffling inside a stream
    caption: str = "after"  # caption "after" the media (captioning), "before" it, or "random"
    vqa_loss: str = "answer"  # VQA samples: loss on the "answer" (+ eos) only, or on "all" text
    question: str = "after"  # VQA samples: the (first) question "after" the media, or "before" it
    n_frames: int = 8  # frames sampled per video
    frame_strategy: str = "segment_random"  # uniform | fps | segment_random | segment_middle
    video_backend: str = "auto"  # decord, pyav, or auto (decord with a per-sample PyAV fallback)
    decode_timeout: float = 30.0  # seconds before a video decode is abandoned (counted)
    max_pixels: int = 50_000_000  # images above this (from the header) are skipped and counted
    eval: str = ""  # VQA set dirs (comma-separated) scored every train.eval_every steps
    eval_limit: int = 200  # questions per set in an in-training evaluation (0 = all)


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    seed: int = 0  # initial weights, data order, every RNG
    micro_batch: int = 4  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seq_len: int = 256  # tokens per packed row
    lr: float = 3e-3  # peak learning rate (after warmup, before cosine decay)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay of matrices (not norms, biases, positions)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    optimizer: str = "adamw"  # "adamw" for every parameter | "muon": Muon for the hidden matrices,
    #   AdamW for the rest (fusion/optim.py), at the same lr, schedule and weight decay
    muon_experts: bool = True  # train.optimizer=muon: the routed experts too (false: AdamW for them,
    #   whose Newton-Schulz cost grows with every expert's parameters, not the active ones)
    loss_average: str = "token"  # next-token loss over tokens: "token" (plain mean) | "sample"
    #   (each document counts the same) | "square" (each token weighted 1/sqrt of its document's count)
    grad_clip: float = 1.0  # clip the global gradient norm (experts included) to this; 0 = off
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    precision: str = "auto"  # "auto" (bf16 on a capable GPU, else fp32) | "fp32" | "bf16"
    ckpt_every: int = 0  # 0 = only at the end
    resume: str = "auto"  # "auto" (latest in run.dir), "none", or a checkpoint path
    keep_checkpoints: int = 0  # keep the newest K checkpoints (0 = keep all)
    max_nonfinite: int = 10  # stop after this many skipped (NaN/Inf) steps in a row (0 = never)
    debug_log: bool = False  # RUN/debug/rank{r}.jsonl: sample keys + weight checksum per step
    log_every: int = 1  # a metrics.jsonl row every this many steps, covering them all
    eval_every: int = 0  # 0 = never during training
    peak_tflops: float = 0.0  # accelerator peak for MFU; 0 = look up a known GPU, else no MFU
    activation_checkpointing: int = 0  # recompute decoder layers in backward: 0 off,
    #   k = layers 0, k, 2k, ... (1 = all)
    compile: bool = False  # torch.compile each decoder block (best with model.moe.path=fast)
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed keys merged into the generated JSON


@dataclass
class DistillConfig:
    teacher: str = ""  # run dir or checkpoint dir of a frozen teacher ("" = no distillation)
    temperature: float = 1.0  # softmax temperature of the KL term (scaled back by T^2)
    weight: float = 0.5  # loss = (1 - weight) * next-token loss + weight * T^2 * KL(teacher || student)


@dataclass
class RunConfig:
    dir: str = "runs/default"  # the run directory (docs/run-directory.md)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)
