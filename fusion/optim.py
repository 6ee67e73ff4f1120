"""The optimizers `train.optimizer` names: "adamw" (torch's AdamW for every parameter) and
"muon" (Muon for the hidden matrices, AdamW for everything else), and how to build either.

Muon (K. Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/) keeps a Nesterov momentum of each matrix's gradient and
steps along its orthogonalised form: the matrix U V^T of the momentum's singular value
decomposition U S V^T, approximated by five iterations of a quintic Newton-Schulz polynomial, so
that every direction of the update moves by the same amount whatever the gradient's spectrum.
Which parameters take it is `step.param_groups`' choice (groups with `muon: True`): the matrices
of the decoder's and the vision tower's linear layers and the routed experts' stacks (each expert's
matrix on its own); embeddings, the output head, the routers, convolutions, norms, biases and
positions keep AdamW, as Muon's authors advise for inputs, outputs and vectors.

The update is scaled as Moonlight's (J. Liu et al., 2025, "Muon is Scalable for LLM Training",
arXiv:2502.16982, section 2.2): 0.2 * sqrt(max(rows, cols)) times the orthogonal matrix, which gives
it about the root-mean-square size of an AdamW update, so that one `train.lr`, one schedule and one
`train.weight_decay` (decoupled, as AdamW's) serve both kinds of group.
"""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "muon")
# per-parameter state that a checkpoint keeps by name (fusion/parallel/files.py, for the experts)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")

# the quintic's coefficients, chosen by Muon's authors to push every singular value towards 1
# quickly from anywhere in (0, 1] (they end in about [0.7, 1.2], which does not hurt the update)
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T for each matrix in the last two dimensions of `g` (leading ones
    are a batch: a stack of experts), in fp32."""
    a, b, c = _NS_COEFFICIENTS
    x = g.float()
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # every singular value <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `muon: True`, AdamW (torch's update, the same state names) for
    the others. Hyperparameters per group: lr, weight_decay (decoupled, both kinds), betas and eps
    (AdamW), momentum and ns_steps (Muon)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            ns_steps=ns_steps,
            muon=False,  # a group's own mark wins
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() < 2:
                        raise ValueError(
                            f"Muon takes matrices (or stacks of them), got a tensor of shape {tuple(p.shape)}"
                        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self._muon if group["muon"] else self._adamw
            for p in group["params"]:
                if p.grad is not None:
                    update(p, group, self.state[p])
        return loss

    @staticmethod
    def _muon(p: torch.Tensor, group: dict, state: dict) -> None:
        grad = p.grad.float()
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        mu = group["momentum"]
        buf.lerp_(grad, 1 - mu)
        nesterov = grad.lerp(buf, mu)
        o = orthogonalize(nesterov, group["ns_steps"])
        scale = 0.2 * math.sqrt(max(p.size(-2), p.size(-1)))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)

    @staticmethod
    def _adamw(p: torch.Tensor, group: dict, state: dict) -> None:
        grad = p.grad
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))


def build_optimizer(
    groups: list[dict], name: str, lr: float, betas, weight_decay: float, **adamw_options
) -> torch.optim.Optimizer:
    """`train.optimizer`'s optimizer over `groups` (dicts from `step.param_groups`; a group's own
    weight_decay wins). AdamW ignores the groups' `muon` marks; `adamw_options` go to torch's AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **adamw_options
        )
    if name == "muon":
        return Muon(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
