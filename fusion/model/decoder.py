"""The decoder-only transformer: RMSNorm, RoPE, grouped-query attention, dense / MoE blocks.

Single-device code; DeepSpeed wraps it in `fusion/train.py`. The decoder takes embeddings, not ids,
so that `fusion/model/fusion.py` can splice vision embeddings in before it runs.

Llama 4's attention, each part switchable in `ModelConfig`:
- NoPE layers (`nope_every`): every nope_every-th layer has no RoPE and attends causally to the
  whole document; its queries are scaled by a temperature that grows with the position
  (`temp_tuning`, `floor_scale`, `attn_scale`).
- chunked local attention (`attn_chunk`): the other (RoPE) layers attend only inside their own
  chunk of `attn_chunk` tokens, counted from the document's start.
- QK norm (`qk_norm`): weightless L2 (RMS) norm of queries and keys on the RoPE layers.
- Llama 3 RoPE frequency scaling (`rope_factor` ...).

Shapes: B batch, T tokens, D dim, Hq query heads, Hkv key/value heads, Dh head dim, V vocab.
Packed rows carry `doc_ids` (B, T): attention stays inside one document (block-diagonal causal
mask) and `positions` (B, T) restart at 0 for each document, so chunks and temperatures are those
the document would get alone.

Two implementations of that masking (`model.attn_impl`): "sdpa" builds dense (B, 1, T, T)
bool masks, the readable reference; "flex" describes the same masks to FlexAttention as block masks
(`document_block_mask`, `chunked_block_mask`), so no T x T tensor exists and blocks that are fully
masked are skipped. With `Kernels.compile_flex` (fusion/model/kernels.py; CUDA by default)
flex_attention is compiled into a fused kernel; otherwise it runs PyTorch's unfused reference
(correct, slow: for tests). `Decoder.compile_blocks` is `train.compile`.

Weights are drawn once, where they are built, by the rule of fusion/model/init.py: a block draws its
attention and dense FFN, an MoE layer its own weights, the decoder its embeddings and output head.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import ModelConfig, dense_baseline_ffn_dim, moe_layer_ids
from fusion.model.ffn import FeedForward
from fusion.model.init import init_attention, init_feed_forward, init_linear, init_matrix
from fusion.model.kernels import Kernels
from fusion.model.moe import MoE, run_checkpointed

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    # a layer's attention mask: dense (B, 1, T, T) bool, a FlexAttention BlockMask, or None (causal)
    Mask = torch.Tensor | BlockMask | None


def uses_rope(layer_id: int, nope_every: int) -> bool:
    """Llama 4's pattern: layers nope_every-1, 2*nope_every-1, ... are NoPE (0 = none are)."""
    return nope_every == 0 or (layer_id + 1) % nope_every != 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16, return in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless QK norm: x / rms(x) over the head dim, in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rope_frequencies(
    head_dim: int,
    theta: float,
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_ctx: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies (Dh/2,), with Llama 3's long-context scaling when factor != 1.

    Wavelengths longer than original_ctx / low_freq_factor are stretched by `factor`; those shorter
    than original_ctx / high_freq_factor are kept; the band between blends the two linearly in
    original_ctx / wavelength.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if factor == 1.0:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > original_ctx / low_freq_factor
    short_wave = wavelen < original_ctx / high_freq_factor
    scaled = torch.where(long_wave, inv_freq / factor, inv_freq)
    if high_freq_factor > low_freq_factor:  # equal factors leave no band between
        t = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - t) * inv_freq / factor + t * inv_freq
        scaled = torch.where(~long_wave & ~short_wave, blended, scaled)
    return scaled


class Rotary(nn.Module):
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... as in Llama 4's complex formulation."""

    inv_freq: torch.Tensor  # (Dh/2,) fp32 buffer, registered in __init__

    def __init__(
        self,
        head_dim: int,
        theta: float,
        factor: float = 1.0,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_ctx: int = 8192,
    ):
        super().__init__()
        inv_freq = rope_frequencies(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_ctx)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq  # (B, T, Dh/2)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); cos, sin (B, T, Dh/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, T, Dh/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)  # (B, H, T, Dh)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask: query i sees key j iff same document and j <= i. (B, 1, T, T)"""
    T = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]


def chunked_mask(positions: torch.Tensor, chunk: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Chunked local causal mask: query i sees key j iff j <= i, same document, and the same chunk
    of `chunk` positions (position // chunk, positions counted from the document's start). (B, 1, T, T)"""
    B, T = positions.shape
    block = positions // chunk  # (B, T)
    same = block[:, :, None] == block[:, None, :]  # (B, T, T)
    if doc_ids is not None:
        same = same & (doc_ids[:, :, None] == doc_ids[:, None, :])
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return (same & causal)[:, None]


def document_block_mask(doc_ids: torch.Tensor, compiled: bool | None = None):
    """`document_mask` as a FlexAttention BlockMask (no dense T x T tensor when `compiled`)."""

    def mask_mod(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)

    return _block_mask(mask_mod, doc_ids, compiled)


def chunked_block_mask(
    positions: torch.Tensor, chunk: int, doc_ids: torch.Tensor | None = None, compiled: bool | None = None
):
    """`chunked_mask` as a FlexAttention BlockMask."""

    def mask_mod(b, h, q, kv):
        keep = (positions[b, q] // chunk == positions[b, kv] // chunk) & (kv <= q)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q] == doc_ids[b, kv])
        return keep

    return _block_mask(mask_mod, positions, compiled)


def _compile_flex(kernels: Kernels | None, like: torch.Tensor) -> bool:
    """The kernel choice (fusion/model/kernels.py) `compile_flex`; without one, compiled on CUDA."""
    return kernels.compile_flex if kernels is not None else like.is_cuda


def _block_mask(mask_mod, like: torch.Tensor, compiled: bool | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = like.shape
    compiled = _compile_flex(None, like) if compiled is None else compiled
    # compiled mask creation never materialises (B, T, T); the eager one does, by blocks of rows
    return create_block_mask(mask_mod, B, None, T, T, device=like.device, _compile=compiled)


_FLEX: dict[str, Callable[..., Any]] = {}  # "compiled": flex_attention under torch.compile, built once


def flex_attention(q, k, v, block_mask, enable_gqa: bool, compiled: bool | None = None):
    """FlexAttention, compiled into one fused kernel when `compiled` (by default on CUDA; the eager
    version materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if _compile_flex(None, q) if compiled is None else compiled:
        if "compiled" not in _FLEX:
            _FLEX["compiled"] = torch.compile(flex, dynamic=False)
        return _FLEX["compiled"](q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with warnings.catch_warnings():  # "called without torch.compile": intended
        warnings.filterwarnings("ignore", message=".*without torch.compile", category=UserWarning)
        return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def attention_temperature(positions: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Llama 4's query scale on NoPE layers (arXiv 2501.19399): 1 + attn_scale * log(1 + floor((pos + 1)
    / floor_scale)); exactly 1 for the first floor_scale - 1 positions. (B, T) -> (B, 1, T, 1)"""
    steps = torch.floor((positions.float() + 1.0) / floor_scale)
    return (1.0 + attn_scale * torch.log1p(steps))[:, None, :, None]


class Attention(nn.Module):
    kernels: Kernels | None = None  # set by FusionModel.use_kernels; None: by device

    def __init__(self, cfg: ModelConfig, use_rope: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.use_rope = use_rope
        self.qk_norm = cfg.qk_norm and use_rope  # Llama 4 normalises q, k on RoPE layers only
        self.norm_eps = cfg.norm_eps
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, q_scale=None):
        """x (B, T, D); mask (B, 1, T, T) bool, a FlexAttention BlockMask, or None (= causal);
        q_scale (B, 1, T, 1) or None."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.use_rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if self.qk_norm:
                q, k = l2_norm(q, self.norm_eps), l2_norm(k, self.norm_eps)
        elif q_scale is not None:
            q = (q * q_scale).to(q.dtype)
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            y = flex_attention(q, k, v, mask, gqa, _compile_flex(self.kernels, q))  # (B, Hq, T, Dh)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, is_moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.use_rope = uses_rope(layer_id, cfg.nope_every)
        self.chunked = self.use_rope and cfg.attn_chunk > 0
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, self.use_rope)
        init_attention(self.attn, cfg.init_std, cfg.n_layers)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # exactly one of the two: an MoE layer, or a dense feed-forward block
        self.moe: MoE | None = None
        self.ffn: FeedForward | None = None
        if is_moe and not cfg.dense_baseline:
            self.moe = MoE(cfg.dim, cfg.moe, cfg.init_std, cfg.n_layers)  # draws its own weights
        else:
            # dense layers have their own width (Llama 4: intermediate_size_mlp, twice an expert's);
            # model.dense_baseline puts a SwiGLU of the MoE layer's active width in its place
            self.ffn = FeedForward(cfg.dim, dense_baseline_ffn_dim(cfg.moe) if is_moe else cfg.ffn_dim)
            init_feed_forward(self.ffn, cfg.init_std, cfg.n_layers)

    def forward(self, x, cos, sin, mask, valid, token_modality, q_scale=None):
        """`mask` is the layer's own: chunked on chunked RoPE layers, full causal elsewhere."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, q_scale)
        h = self.ffn_norm(x)
        if self.moe is None:
            assert self.ffn is not None  # a block without an MoE layer has a dense one
            zero = x.new_zeros((), dtype=torch.float32)
            return x + self.ffn(h), zero, zero
        y, aux, z = self.moe(h, valid=valid, modality=token_modality)
        return x + y, aux, z


class Decoder(nn.Module):
    kernels: Kernels | None = None  # set by FusionModel.use_kernels; None: by device

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        moe_ids = set(moe_layer_ids(cfg.n_layers, cfg.moe.every, cfg.moe.n_experts))
        self.layers = nn.ModuleList(Block(cfg, i, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.checkpoint_every = (
            0  # train.activation_checkpointing: recompute layers 0, k, 2k, ... in backward
        )
        self.rotary = Rotary(
            cfg.dim // cfg.n_heads,
            cfg.rope_theta,
            cfg.rope_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_ctx,
        )
        init_matrix(self.tok_embeddings.weight, cfg.init_std)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        else:
            init_linear(self.output, cfg.init_std)

    def compile_blocks(self, **options) -> None:
        """`train.compile`: torch.compile each block in place (one graph, reused by every layer of
        the same kind); `options` go to torch.compile. Graphs are static-shaped with
        `model.moe.path=fast`; the other MoE paths index by data-dependent counts and break the
        graph there."""
        for layer in self.layers:
            layer.compile(**options)

    @property
    def moe_layers(self) -> list[MoE]:
        """The MoE layers of the blocks, in layer order."""
        return [b.moe for b in self.layers if isinstance(b, Block) and b.moe is not None]

    def attention_inputs(
        self, positions: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> tuple[Mask, Mask, torch.Tensor | None]:
        """What the layers share: (full mask, chunked mask, NoPE query scale); None where unused.
        Masks are dense bool tensors (attn_impl "sdpa") or FlexAttention BlockMasks ("flex")."""
        cfg = self.cfg
        flex = cfg.attn_impl == "flex"
        compiled = _compile_flex(self.kernels, positions)
        full = None  # None: plain causal
        if doc_ids is not None:
            full = document_block_mask(doc_ids, compiled) if flex else document_mask(doc_ids)
        chunk = None
        if any(b.chunked for b in self.layers):
            chunk = (
                chunked_block_mask(positions, cfg.attn_chunk, doc_ids, compiled)
                if flex
                else chunked_mask(positions, cfg.attn_chunk, doc_ids)
            )
        q_scale = None
        if cfg.temp_tuning and not all(b.use_rope for b in self.layers):
            q_scale = attention_temperature(positions, cfg.floor_scale, cfg.attn_scale)
        return full, chunk, q_scale

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        token_modality: torch.Tensor | None = None,
        cross: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T, D) embeddings -> (logits (B, T, V), aux_loss, z_loss) means over MoE layers.
        `cross(i, h) -> h` runs before layer i (late fusion's cross-attention, fusion/model/late.py)."""
        B, T, _ = h.shape
        if self.cfg.attn_impl == "flex" and not h.is_cuda and torch.is_grad_enabled() and h.requires_grad:
            raise ValueError(
                "config key 'model.attn_impl': flex trains on CUDA only (PyTorch has no "
                "FlexAttention backward on this device); use model.attn_impl=sdpa"
            )
        if positions is None:
            positions = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = self.rotary(positions)
        full, chunk, q_scale = self.attention_inputs(positions, doc_ids)
        aux_total = h.new_zeros((), dtype=torch.float32)
        z_total = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            if cross is not None:
                h = cross(i, h)
            mask = chunk if layer.chunked else full
            args = (h, cos, sin, mask, valid, token_modality, q_scale)
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                h, aux, z = run_checkpointed(layer, *args)
            else:
                h, aux, z = layer(*args)
            aux_total, z_total = aux_total + aux, z_total + z
        n_moe = max(len(self.moe_layers), 1)
        return self.output(self.norm(h)), aux_total / n_moe, z_total / n_moe
