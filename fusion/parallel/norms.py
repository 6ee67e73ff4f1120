"""How the experts' gradient norm joins DeepSpeed's: one hook per optimizer wrapper DeepSpeed 0.19.8
can pick here (fusion.config.deepspeed_config), so that the global norm is
sqrt(|g_dense|^2 + sum over all expert shards of |g_expert|^2), and the clip coefficient both
parts are multiplied by.

`hook_norm(ep, engine)` installs the hook and returns the mode `ExpertParallel` records:

- "bf16": BF16_Optimizer (bf16, ZeRO 1, fp32 gradient accumulation). Its norm is taken over
  the tensors `get_grads_for_norm` returns: the experts join as one more, whose norm is theirs.
- "zero": DeepSpeedZeroOptimizer (ZeRO 1 in fp32, ZeRO 2 in fp32 and bf16): `scaled_global_norm`.
- "unfused": FP16_UnfusedOptimizer in bf16 (no ZeRO): its step is replaced (`take_over_unfused`).
- "fp32": the torch optimizer itself (fp32, no ZeRO): the reduced dense gradients sit in
  `.grad`; `ExpertParallel.reduce_grads` computes the norm and clips them, DeepSpeed's clipping
  is off.

The hooks read the experts' squared norm from `ep.expert_sq` when DeepSpeed asks, after
`ExpertParallel.reduce_grads` has set it. Everything stays on the device (no host read).
"""

from __future__ import annotations

import functools

import torch

from fusion.parallel.accumulation import add_into_fp32, fp32_grads


def hook_norm(ep, engine) -> str:
    """Make DeepSpeed's global gradient norm include the experts of `ep` (an ExpertParallel)
    (sqrt(|dense|^2 + |experts|^2)), so that it clips the dense part with it; `ExpertParallel.step`
    clips the experts with the same norm. Returns the mode (see the module docstring)."""
    opt = engine.optimizer
    if is_bf16_optimizer(opt):
        base_grads = opt.get_grads_for_norm

        def get_grads_for_norm(for_clipping=False):
            grads = base_grads(for_clipping=for_clipping)
            if for_clipping or ep.expert_sq is None:
                return grads
            dense, moe = grads
            return [*dense, ep.expert_sq.sqrt().reshape(1)], moe

        opt.get_grads_for_norm = get_grads_for_norm
        return "bf16"
    if hasattr(opt, "scaled_global_norm"):
        base = opt.scaled_global_norm

        def scaled_global_norm(norm_type=2):
            return _combine(base(norm_type), ep.expert_sq, getattr(opt, "loss_scale", 1.0))

        opt.scaled_global_norm = scaled_global_norm
        return "zero"
    if is_unfused_bf16(opt):
        take_over_unfused(ep, opt)
        return "unfused"
    if isinstance(opt, torch.optim.Optimizer) and not engine.bfloat16_enabled() and not engine.fp16_enabled():
        # plain fp32 data parallel: reduce_grads clips the dense grads with the global norm
        engine.clip_fp32_gradients = lambda: None
        return "fp32"
    raise ValueError(
        f"routed experts: no way to add their gradient norm to DeepSpeed's "
        f"{type(opt).__name__} (use ZeRO 0/1/2 with fp32 or bf16)"
    )


def take_over_unfused(ep, opt) -> None:
    """bf16 without ZeRO. DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters of the bf16
    parameters but sums the micro-steps' gradients in the bf16 `.grad`, reduces them in bf16
    and copies them to the masters at the step; DeepSpeed refuses fp32 accumulation here. So:
    each bf16 gradient is added into its master's fp32 `.grad` as backward produces it (and
    freed), DeepSpeed all-reduces those fp32 gradients at the boundary (it asks the wrapper's
    `get_grads_for_reduction`), and the wrapper's step is this one: the global norm (dense and
    experts of `ep`), clipping, the torch optimizer's step, the masters copied into the bf16 weights.

    The wrapper also ran one AdamW step with zero gradients when it was built (to create the
    optimizer state): that step counts in AdamW's bias correction and applies weight decay to
    the masters. It is undone here, so that the first step is AdamW's first, as at ZeRO 1/2."""
    opt.optimizer.state.clear()
    opt.refresh_fp32_params()  # masters = the bf16 weights, which that step did not touch
    pairs = [(lp, hp) for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)]
    for lp, hp in pairs:
        if lp.requires_grad:
            lp.register_post_accumulate_grad_hook(functools.partial(add_into_fp32, hp))
    masters = [hp for _, hp in pairs]

    def get_grads_for_reduction():
        return fp32_grads(masters), {}

    @torch.no_grad()
    def step(closure=None):
        grads = fp32_grads(masters)
        sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
        if ep.expert_sq is not None:
            sq = sq + ep.expert_sq.to(sq.device)
        norm = sq.sqrt()
        coef = clip_coef(norm, ep.grad_clip, ep.norm_mode)
        if coef is not None:
            for g in grads:
                g.mul_(coef)
        opt.overflow = False  # the non-finite skip is NonFiniteGuard's (it no-ops the step below)
        opt._global_grad_norm = norm
        opt.optimizer.step()
        for lp, hp in pairs:
            hp.grad = None
            lp.data.copy_(hp.data)
        return False

    opt.get_grads_for_reduction = get_grads_for_reduction
    opt.step = step


def clip_coef(norm: torch.Tensor, grad_clip: float, mode: str | None) -> torch.Tensor | None:
    """The factor gradients are multiplied by, a device scalar: grad_clip / (norm + 1e-6) capped
    at 1, in the form DeepSpeed's wrapper (`mode`) computes it (so both parts get the same
    number); 1 for a norm that is not a finite, non-negative number; None without clipping."""
    if grad_clip <= 0:
        return None
    if mode == "zero":  # DeepSpeedZeroOptimizer.unscale_and_clip_grads (loss scale 1)
        coef = 1.0 / ((norm + 1e-6) / grad_clip).clamp(min=1.0)
    else:  # clip_tensors_by_global_norm (BF16_Optimizer), torch's clip_grad_norm_
        coef = (grad_clip / (norm + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm) & (norm >= 0), coef, torch.ones_like(coef))


def _combine(dense: torch.Tensor, expert_sq: torch.Tensor | None, scale=1.0) -> torch.Tensor:
    """sqrt(dense^2 + (scale * |experts|)^2), keeping DeepSpeed's -1 'invalid norm' sentinel. All
    device arithmetic (`scale`: the loss scale, a number or a device scalar)."""
    if expert_sq is None:
        return dense
    dense = torch.as_tensor(dense)
    e = expert_sq.to(device=dense.device, dtype=torch.float32) * scale * scale
    total = (dense.float().pow(2) + e).sqrt()
    bad = (dense < 0) | ~torch.isfinite(total)
    return torch.where(bad, torch.full_like(total, -1.0), total)


def is_bf16_optimizer(opt) -> bool:
    """DeepSpeed's BF16_Optimizer (bf16 with fp32 gradient accumulation at ZeRO 1)."""
    if not type(opt).__module__.startswith("deepspeed."):
        return False
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(opt, BF16_Optimizer)


def is_unfused_bf16(opt) -> bool:
    """DeepSpeed's FP16_UnfusedOptimizer holding bf16 parameters (bf16 without ZeRO)."""
    if not type(opt).__module__.startswith("deepspeed."):
        return False
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(opt, FP16_UnfusedOptimizer) and opt.low_precision_dtype == torch.bfloat16
