"""The GPU dry run: one training step of a config on an accelerator stand-in, on any machine.

    fusion-train --config configs/small.yaml --dry-run --world 8
    fusion-train --dry-run --world 64 model.size=llama4-scout train.seq_len=8192 model.moe.ep_size=16

It runs the real model and the real code of a step (`fusion.train.train_step`, the logging
reduction, checkpoint selection, the evaluation reduction) as rank 0 of a world of N ranks, and
fails on what a GPU run would hit. What stands in for what:

- The device: `meta` tensors (shapes, dtypes, strides; no values, no memory), so a 100-billion-
  parameter model fits a laptop. Forward, backward, the experts' all-to-all and the optimizer
  update all run on them. A host read of a meta tensor raises (`.item()`, `.tolist()`, `nonzero`,
  boolean indexing, `bincount`): a host sync cannot hide, except through `fusion.dist.fetch`, the
  step's named, allowed reads, which the report lists.
- The process group: PyTorch's fake backend registered for `meta` only, so a CPU tensor handed to
  any collective raises "No backend type associated with device type cpu", as under NCCL.
- The GPU's kernel choices (`Kernels(grouped_mm=True, side_stream=True)`): `torch._grouped_mm`'s
  meta kernel checks strides and alignment as the CUDA kernel does; the shared expert's side
  stream is `CheckedStreams`, which fails when a tensor crosses streams without a wait and a
  record, forward or backward.
- CUDA itself, for the CUDA-only branches: a forward of the model on FakeTensorMode "cuda"
  tensors with `model.attn_impl=flex` (FlexAttention refuses meta tensors; its eager path runs
  on fake CUDA tensors). Backward cannot run there: the autograd engine asks the CUDA driver for
  a context.
- DeepSpeed's engine: `StandInEngine`, the calls `train_step` makes on it, done the way ZeRO 1/2
  data parallelism does them (bf16 module, gradients all-reduced in one flat fp32 buffer over the
  communication device, clipping by the global norm). DeepSpeed itself cannot run here: building
  the engine places the module on its accelerator's device and flattens parameter data, which
  meta tensors do not have.
- dtypes: the module is cast to the run's precision (bf16 on a GPU with `train.precision=auto`)
  as DeepSpeed casts it; matrix products outside the router (fp32 by design) must run in that
  precision; no float64 op may take part in autograd; the router's bias and load buffers keep
  their own dtypes.

What it leaves to a real GPU: numerics, kernel speed and real memory use, inductor/triton code
generation (compiled FlexAttention, `train.compile`), NCCL itself (hangs, timeouts, topology),
DeepSpeed's engine (ZeRO partitioning, its bf16 optimizer, its own host syncs), the data loader
and checkpoint files. `tools/gpu_bench.sh` runs those on a GPU when one is lent.
"""

from fusion.dryrun.run import DryRunError, Report, dry_run, explain

__all__ = ["DryRunError", "Report", "dry_run", "explain"]
