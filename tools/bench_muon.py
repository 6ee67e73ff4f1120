"""What `train.optimizer=muon` costs a step, by parameter: the Newton-Schulz orthogonalisation of
each matrix Muon takes, and one whole optimizer step of AdamW, of Muon, and of Muon with the
routed experts on AdamW (`train.muon_experts=false`), on one CPU thread as each training rank has.

    python tools/bench_muon.py [--config configs/demo.yaml] [--repeat 10] [key=value ...]

The model is the config's, with random gradients; nothing is trained. Times are the median of
`--repeat` calls after two warm-up calls. Compare rows within one run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_ms(fn, repeat: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def kind_of(name: str) -> str:
    for key, kind in (
        (".moe.experts.", "routed experts"),
        (".moe.shared.", "shared expert"),
        (".ffn.", "dense FFN"),
        (".attn.", "attention"),
        ("vision.", "vision tower"),
    ):
        if key in name:
            return kind
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    from fusion.config import load_config
    from fusion.data.tokenizer import build_tokenizer
    from fusion.model.fusion import build_model
    from fusion.optim import build_optimizer, orthogonalize
    from fusion.step import param_groups

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model, build_tokenizer(cfg.data.tokenizer))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    names = {id(p): n for n, p in model.named_parameters()}
    t = cfg.train

    by_kind: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for group in param_groups(model, t.weight_decay, cfg.model.vision, muon=True):
        if group["muon"]:
            for p in group["params"]:
                kind = kind_of(names[id(p)])
                by_kind[kind] += median_ms(lambda p=p: orthogonalize(p.grad), args.repeat)
                count[kind] += p.numel()
    print(f"Newton-Schulz orthogonalisation per step, {args.config}, one thread:")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:16s} {count[kind]:>9,d} weights {ms:7.1f} ms")
    print(f"  {'all':16s} {sum(count.values()):>9,d} weights {sum(by_kind.values()):7.1f} ms")

    print("one optimizer step:")
    for label, name, experts in (
        ("adamw", "adamw", True),
        ("muon", "muon", True),
        ("muon, experts on AdamW", "muon", False),
    ):
        groups = param_groups(model, t.weight_decay, cfg.model.vision, name == "muon", experts)
        opt = build_optimizer(groups, name, t.lr, t.betas, t.weight_decay)
        print(f"  {label:24s} {median_ms(opt.step, args.repeat):7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
