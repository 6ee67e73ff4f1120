"""Expert parallelism: the one place where routed experts meet process groups.

Owns the expert-parallel groups, the all-to-all dispatcher that carries tokens to the rank holding
their expert and back, and everything the trainer does to routed-expert parameters: their
gradient reduction, their optimizer, their share of the gradient norm, and their checkpoint files.
Model code stays single-device: `MoE.forward` calls `moe.dispatcher` when one is installed here.

Layout (`fusion.dist.expert_groups`, DeepSpeed's layout): with W ranks and ep_size P, the
expert-parallel groups are consecutive ranks [0..P-1], [P..2P-1], ...; rank r holds experts
[(r % P) * E/P, (r % P + 1) * E/P) of every MoE layer; the expert-data-parallel group of r is
{r % P, r % P + P, ...}, the ranks that hold the same experts.

Why experts live outside the DeepSpeed engine. DeepSpeed 0.19.8 reduces `allreduce=False`
parameters over expert groups only when it finds its own `deepspeed.moe.layer.MoE` modules; its
expert checkpoint code assumes that module's per-expert layout and cannot reshard optimizer state
across ep sizes, and it averages per-group gradient norms instead of summing squares. So:

- DeepSpeed gets `EngineView(model)`: the model minus its routed-expert parameters. ZeRO 0/1/2,
  bf16 and its checkpoints handle everything else, unchanged.
- `ExpertParallel` keeps the expert parameters: it reduces their gradients over the
  expert-data-parallel group in fp32 (divided by the world size, like DeepSpeed's data-parallel
  mean), steps them with its own AdamW (same hyperparameters and learning-rate schedule; fp32
  master weights when the model runs in bf16, into whose fp32 gradients the bf16 ones are summed
  over the micro-steps), and writes them, with their optimizer state, as
  safetensors files inside the checkpoint directory, one per expert shard. Loading reads every
  shard of the saved ep size, joins them along the expert axis and takes this rank's slice, so a
  checkpoint resumes at any ep size.
- Gradient clipping sees the true global norm: sqrt(|g_dense|^2 + sum over all expert shards of
  |g_expert|^2). The expert part is summed over the expert-parallel group; it is added to the norm
  DeepSpeed computes (ZeRO 2, and ZeRO 1 in fp32: `scaled_global_norm`; ZeRO 1 in bf16:
  BF16_Optimizer's `get_grads_for_norm`) or, without ZeRO, computed here (bf16: the step of DeepSpeed's
  FP16_UnfusedOptimizer is replaced, see `norms.take_over_unfused`; fp32: the reduced
  gradients sit in `.grad`). The experts are clipped with the same coefficient as the rest, and
  the norm, the coefficient and the returned norm stay on the device (no host read).
- The experts' optimizer state is sharded by expert parallelism only (ZeRO does not partition it).

Router statistics need nothing here: each rank counts its own tokens' choices before dispatch and
the trainer all-reduces the counts over all ranks.

Shapes: M routed (token, expert) pairs on this rank, D dim, E experts, El = E / P local experts.

Modules, one concern each:
    dispatch.py     the all-to-all dispatcher (`ExpertDispatcher`), the only code that moves tokens
    engine_view.py  what DeepSpeed sees (`EngineView`) and `restore_buffer_dtypes` after its cast
    experts.py      `ExpertParallel`: sharding, fp32 masters, gradient reduction, the optimizer step
    accumulation.py fp32 gradient accumulation of bf16 parameters (the post-accumulate-grad hook)
    norms.py        the hooks that join the experts' norm to each DeepSpeed optimizer wrapper
    files.py        the experts' checkpoint files (any ep size) and gathered, unsharded copies
"""

from fusion.parallel.dispatch import ExpertDispatcher, even_split
from fusion.parallel.engine_view import EngineView, expert_parameter_names, restore_buffer_dtypes
from fusion.parallel.experts import ExpertParallel
from fusion.parallel.files import EXPERT_FILE

__all__ = [
    "EXPERT_FILE",
    "EngineView",
    "ExpertDispatcher",
    "ExpertParallel",
    "even_split",
    "expert_parameter_names",
    "restore_buffer_dtypes",
]
