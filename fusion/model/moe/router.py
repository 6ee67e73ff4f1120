"""The MoE router: token-choice top-k routing and group-limited routing.

Owns the scores (Llama 4 sigmoid or softmax), the choice of each token's K experts, the gate
values, and the persistent DeepSeek-V3 aux-loss-free `expert_bias` (a buffer that moves the choice,
never the gate). Load counting and the bias update belong to the layer (fusion/model/moe/layer.py).

Group-limited routing (DeepSeek-V3's node-limited routing): with `n_groups` > 1 the E experts form
n_groups contiguous groups; each token first keeps its best `topk_groups` groups, then takes its
top-k experts inside them. A group's score is the sum of its two best selection scores (logits
plus bias for sigmoid routing, probabilities plus bias for softmax) as in DeepSeek-V3, or its best
one when a group holds a single expert.

Shape legend:
    N tokens routed (the valid ones of B*T, or all of them), D model dim, E experts, K top-k,
    G expert groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import MoEConfig


class Router(nn.Module):
    """Token-choice top-k router.

    sigmoid (Llama 4): top-k on the logits, gate = sigmoid(chosen logit).
    softmax: top-k on softmax probabilities, gate = chosen probability (optionally renormalised).
    With balance="bias" the persistent `expert_bias` (DeepSeek-V3, aux-loss-free) is added to the
    scores used for *choosing* only; the gate value never sees it.
    """

    expert_bias: torch.Tensor  # (E,) fp32 buffer, registered in __init__

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.n_groups, self.topk_groups = cfg.n_groups, cfg.topk_groups
        self.gate = nn.Linear(dim, cfg.n_experts, bias=False)
        # fp32 whatever the model dtype: the bias moves by bias_rate (1e-3) steps, below bf16 resolution
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> top-k expert ids (N, K) long, gates (N, K) fp32, logits (N, E) fp32."""
        cfg = self.cfg
        # routing decisions are sensitive to rounding: score in fp32 (Megatron, torchtitan)
        logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        scores = logits if cfg.score == "sigmoid" else logits.softmax(dim=-1)  # (N, E)
        choice = scores + self.expert_bias.float() if cfg.balance == "bias" else scores
        if self.n_groups > 1 and self.topk_groups < self.n_groups:
            choice = self.limit_to_groups(choice)
        topk_idx = choice.topk(cfg.top_k, dim=-1).indices  # (N, K)
        chosen = scores.gather(-1, topk_idx)  # (N, K), raw scores: the bias never enters the gate
        if cfg.score == "sigmoid":
            gates = chosen.sigmoid()
        else:
            gates = chosen
            if cfg.norm_topk:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        return topk_idx, gates, logits

    def limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """(N, E) selection scores -> the same with experts outside each token's best topk_groups
        groups set to -inf (DeepSeek-V3 node-limited routing)."""
        N, E = choice.shape
        grouped = choice.view(N, self.n_groups, E // self.n_groups)  # (N, G, E/G)
        top = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values  # (N, G, 2)
        group_score = top.sum(-1) if self.cfg.score == "sigmoid" else top[..., 0]  # (N, G)
        keep = group_score.topk(self.topk_groups, dim=-1).indices  # (N, Gk)
        mask = torch.zeros(N, self.n_groups, dtype=torch.bool, device=choice.device)
        mask.scatter_(1, keep, True)
        return grouped.masked_fill(~mask[..., None], float("-inf")).view(N, E)  # (N, E)
