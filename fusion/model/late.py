"""Late fusion: the decoder reads text only; media enter through gated cross-attention.

`model.fusion=late` is the baseline that Llama 4's early fusion replaced: Flamingo / Llama 3.2
Vision style. Same vision tower, same data and sequences, same evaluation; only where the media
embeddings go differs:

- The `<|patch|>` placeholders are taken OUT of the decoder's sequence: each row is compacted to
  its other tokens (text and the media markers `<|image_start|>`, `<|image_end|>`, video markers
  and frame separators, which stay as ordinary tokens: they say where the media was), positions
  are renumbered so each document counts only the tokens it keeps, and the decoder runs on that.
  Its logits are put back at the original positions; placeholder positions get zero logits (they
  carry no label, and no prediction is made there).
- The media embeddings (the vision tower's output, as early fusion would splice them) are the keys
  and values of a gated cross-attention block run before decoder layers 0, k, 2k, ...
  (`model.xattn_every` = k). A block is Flamingo's gated xattn-dense: x + tanh(a) * xattn(x, media),
  then x + tanh(b) * ffn(x), with scalar gates a, b initialised at 0, so at initialisation the model
  is exactly the text-only decoder.
- A text token attends to the media tokens of its own sample (`doc_ids`) that come before it in
  the row (the placeholders early fusion would have let it see). Tokens that see no media (text-only
  samples, a caption before its image) are left unchanged by the block, as Llama 3.2 Vision masks
  whole text rows.

Weights follow the decoder's rule (fusion/model/init.py): each block draws its attention and FFN
once when it is built; norms start at 1, gates at 0.

Shapes: B batch, T tokens of the full row, Tt tokens the decoder reads, Nm media tokens of a row
(padded to the longest), D dim, V vocab, Hq / Hkv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import ModelConfig
from fusion.model.decoder import RMSNorm
from fusion.model.ffn import FeedForward
from fusion.model.init import init_attention, init_feed_forward


def xattn_layer_ids(n_layers: int, every: int) -> list[int]:
    """Decoder layers that a cross-attention block runs before: 0, every, 2 * every, ..."""
    return list(range(0, n_layers, every))


class CrossAttention(nn.Module):
    """Grouped-query attention from text queries to media keys/values, no RoPE (media carry their
    own frame positions from the vision tower)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Tt, D), media (B, Nm, D), mask (B, 1, Tt, Nm) bool (every row has a True)."""
        B, Tt, _ = x.shape
        Nm = media.shape[1]
        q = self.wq(x).view(B, Tt, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, Tt, Dh)
        k = self.wk(media).view(B, Nm, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Nm, Dh)
        v = self.wv(media).view(B, Nm, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Nm, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, Hq, Tt, Dh)
        return self.wo(y.transpose(1, 2).reshape(B, Tt, -1))  # (B, Tt, D)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated xattn-dense block; both gates start closed (tanh(0) = 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.media_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = CrossAttention(cfg)
        init_attention(self.attn, cfg.init_std, cfg.n_layers)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        init_feed_forward(self.ffn, cfg.init_std, cfg.n_layers)
        # shape (1,), not (): DeepSpeed's flat buffers want at least one dimension
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, media, mask, sees):
        """x (B, Tt, D); media (B, Nm, D); mask (B, 1, Tt, Nm); sees (B, Tt, 1): 1 where the token
        sees at least one media token, else 0 (the block leaves it unchanged)."""
        y = self.attn(self.attn_norm(x), self.media_norm(media), mask)  # (B, Tt, D)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * y * sees
        y = self.ffn(self.ffn_norm(x))  # (B, Tt, D)
        return x + torch.tanh(self.ffn_gate).to(x.dtype) * y * sees


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> (idx (B, Tk) long, ok (B, Tk) bool): per row, the positions where `keep` is
    True in order, padded to the longest row (Tk >= 1); `ok` marks real entries."""
    n = keep.sum(1)  # (B,)
    width = max(int(n.max()) if keep.numel() else 0, 1)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # kept positions first
    idx = order[:, :width]  # (B, Tk)
    ok = torch.arange(width, device=keep.device)[None, :] < n[:, None]  # (B, Tk)
    return idx, ok


def text_positions(positions: torch.Tensor, doc: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """Positions once the media placeholders are gone: each token's position minus the
    placeholders before it in its own document. All (B, T)."""
    B, T = doc.shape
    ar = torch.arange(T, device=doc.device).expand(B, T)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    doc_start = torch.where(starts, ar, torch.zeros_like(ar)).cummax(1).values  # (B, T)
    before = media.long().cumsum(1) - media.long()  # placeholders strictly before t in the row
    return positions - (before - before.gather(1, doc_start))


class LateFusion(nn.Module):
    """The cross-attention blocks of a late-fusion model and the forward that uses them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_ids = xattn_layer_ids(cfg.n_layers, cfg.xattn_every)
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(cfg) for _ in self.layer_ids)

    def forward(self, model, input_ids, positions=None, doc_ids=None, images=None, videos=None):
        """The late-fusion forward of FusionModel `model`.
        -> (logits (B, T, V), zero at placeholder positions; aux_loss; z_loss)"""
        B, T = input_ids.shape
        # vision embeddings sit at their placeholders, exactly as early fusion would feed them
        # (count checks included); everything else holds the token embeddings
        h, token_modality = model.embed(input_ids, images, videos)  # (B, T, D), (B, T)
        D = h.shape[-1]
        is_media = token_modality > 0  # (B, T)
        doc = doc_ids if doc_ids is not None else torch.zeros_like(input_ids)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)

        # ---- the decoder's sequence: every token but the placeholders ----
        idx_t, ok_t = compact(~is_media)  # (B, Tt)
        text = h.gather(1, idx_t[..., None].expand(-1, -1, D))  # (B, Tt, D)
        doc_t = doc.gather(1, idx_t).masked_fill(~ok_t, -1)  # (B, Tt)
        pos_t = text_positions(positions, doc, is_media).gather(1, idx_t).masked_fill(~ok_t, 0)  # (B, Tt)
        seen_t = ok_t & (doc_t >= 0)  # real tokens, not padding
        padded = doc_ids is not None or not bool(ok_t.all())

        # ---- the media: keys and values of the cross-attention ----
        idx_m, ok_m = compact(is_media)  # (B, Nm)
        media = h.gather(1, idx_m[..., None].expand(-1, -1, D))  # (B, Nm, D)
        doc_m = doc.gather(1, idx_m).masked_fill(~ok_m, -2)  # (B, Nm); -2 matches no token
        # token i sees media j: same document, and the placeholder came before the token
        mask = (
            (doc_m[:, None, :] == doc_t[:, :, None])
            & (idx_m[:, None, :] < idx_t[:, :, None])
            & seen_t[:, :, None]
        )  # (B, Tt, Nm)
        sees = mask.any(-1)  # (B, Tt)
        mask = (mask | ~sees[..., None])[:, None]  # (B, 1, Tt, Nm): no empty softmax row
        sees = sees[..., None].to(h.dtype)  # (B, Tt, 1)

        blocks = dict(zip(self.layer_ids, self.blocks))

        def cross(i, x):
            block = blocks.get(i)
            return x if block is None else block(x, media, mask, sees)

        logits, aux, z = model.decoder(
            text,
            positions=pos_t,
            doc_ids=doc_t if padded else None,
            valid=seen_t if padded else None,
            token_modality=torch.zeros_like(doc_t),
            cross=cross,
        )
        V = logits.shape[-1]
        out = logits.new_zeros(B, T, V)
        out.scatter_(1, idx_t[..., None].expand(-1, -1, V), logits * ok_t[..., None].to(logits.dtype))
        return out, aux, z
