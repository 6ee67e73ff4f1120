"""The model: embed text, (later) encode media and splice it in at placeholder runs, run the decoder, loss.

Shapes: B batch, T tokens, D dim, V vocab. Modalities are numbered TEXT=0, IMAGE=1, VIDEO=2
everywhere (data, loss, router statistics).

`model(input_ids)` with a LongTensor (B, T) alone returns logits (B, T, V). Given `labels` it
returns a `ModelOutput` with the total loss the trainer backpropagates and its parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import ModelConfig
from fusion.model.decoder import Decoder

MODALITIES = ("text", "image", "video")
IGNORE = -100  # label value with no loss: padding, placeholders, media markers


@dataclass
class ModelOutput:
    loss: torch.Tensor                 # what is backpropagated: lm + weighted balancing losses
    lm_loss: torch.Tensor              # mean next-token loss over labelled tokens of this batch
    aux_loss: torch.Tensor             # raw Switch aux loss, mean over MoE layers
    z_loss: torch.Tensor               # raw router z-loss, mean over MoE layers
    loss_sum: torch.Tensor             # (3,) summed token losses per sample modality (detached)
    loss_count: torch.Tensor           # (3,) labelled tokens per sample modality
    logits: torch.Tensor | None = None


class FusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.decoder = Decoder(cfg, vocab_size)

    @property
    def moe_layers(self):
        return self.decoder.moe_layers

    def forward(self, input_ids, labels=None, positions=None, doc_ids=None, sample_modality=None,
                valid=None, return_logits=False):
        h = self.decoder.tok_embeddings(input_ids)  # (B, T, D)
        if valid is None and labels is not None:
            valid = doc_ids >= 0 if doc_ids is not None else None
        token_modality = None  # text only until media tokens exist
        logits, aux, z = self.decoder(h, positions=positions, doc_ids=doc_ids, valid=valid,
                                      token_modality=token_modality)
        if labels is None:
            return logits
        return self.loss(logits, labels, aux, z, sample_modality, return_logits)

    def loss(self, logits, labels, aux, z, sample_modality, return_logits) -> ModelOutput:
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                    ignore_index=IGNORE, reduction="none")  # (B*T,)
        mask = labels.flatten() != IGNORE
        n = mask.sum()
        lm_loss = per_token.sum() / n.clamp(min=1)
        if sample_modality is None:
            sample_modality = torch.zeros_like(labels)
        mod = sample_modality.flatten()
        loss_sum = torch.zeros(3, device=logits.device).index_add_(0, mod[mask], per_token[mask].detach())
        loss_count = torch.bincount(mod[mask], minlength=3).float()
        moe = self.cfg.moe
        total = lm_loss + moe.z_coef * z
        if moe.balance == "aux":
            total = total + moe.aux_coef * aux
        return ModelOutput(loss=total, lm_loss=lm_loss.detach(), aux_loss=aux.detach(),
                           z_loss=z.detach(), loss_sum=loss_sum, loss_count=loss_count,
                           logits=logits if return_logits else None)


def build_model(cfg: ModelConfig, vocab_size: int) -> FusionModel:
    vocab = cfg.vocab_size or vocab_size
    if vocab < vocab_size:
        raise ValueError(f"config key 'model.vocab_size': {vocab} is smaller than the tokenizer's "
                         f"{vocab_size} tokens")
    return FusionModel(cfg, vocab)
