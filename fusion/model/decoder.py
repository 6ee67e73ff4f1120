"""The decoder-only transformer: RMSNorm, RoPE, grouped-query attention, dense / MoE blocks.

Single-device code; DeepSpeed wraps it in `fusion/train.py`. The decoder takes embeddings, not ids,
so that `fusion/model/fusion.py` can splice vision embeddings in before it runs.

Shapes: B batch, T tokens, D dim, Hq query heads, Hkv key/value heads, Dh head dim, V vocab.
Packed rows carry `doc_ids` (B, T): attention stays inside one document (block-diagonal causal
mask) and `positions` (B, T) restart at 0 for each document.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import ModelConfig, moe_layer_ids
from fusion.model.ffn import FeedForward
from fusion.model.moe import MoE


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


class Rotary(nn.Module):
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... as in Llama 4's complex formulation."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, is_moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = MoE(cfg.dim, cfg.moe, cfg.init_std) if is_moe else None
        self.ffn = None if is_moe else FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, valid, token_modality):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        h = self.ffn_norm(x)
        if self.moe is None:
            zero = x.new_zeros((), dtype=torch.float32)
            return x + self.ffn(h), zero, zero
        y, aux, z = self.moe(h, valid=valid, modality=token_modality)
        return x + y, aux, z


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        moe_ids = set(moe_layer_ids(cfg.n_layers, cfg.moe.every, cfg.moe.n_experts))
        self.layers = nn.ModuleList(Block(cfg, i, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.rotary = Rotary(cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2 or ".moe." in name and ".experts." in name:
                continue  # norms keep 1.0; experts initialise themselves
            # residual-stream outputs shrink with depth (GPT-2): keeps the sum's variance bounded
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
            nn.init.normal_(p, 0.0, std * scale)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.moe for b in self.layers if b.moe is not None]

    def forward(self, h, positions=None, doc_ids=None, valid=None, token_modality=None):
        """h (B, T, D) embeddings -> (logits (B, T, V), aux_loss, z_loss) means over MoE layers."""
        B, T, _ = h.shape
        if positions is None:
            positions = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = self.rotary(positions)
        mask = None if doc_ids is None else document_mask(doc_ids)
        aux_total = h.new_zeros((), dtype=torch.float32)
        z_total = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, aux, z = layer(h, cos, sin, mask, valid, token_modality)
            aux_total, z_total = aux_total + aux, z_total + z
        n_moe = max(len(self.moe_layers), 1)
        return self.output(self.norm(h)), aux_total / n_moe, z_total / n_moe
