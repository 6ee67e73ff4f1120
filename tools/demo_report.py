"""Print the demo's toy-VQA table (accuracy beside blind and chance), whether the demo's promise
holds, how long `make demo` took, and where its outputs are.

    python tools/demo_report.py --run runs/demo --vqa data/toy/vqa_image_test data/toy/vqa_video_test \\
        [--started EPOCH_SECONDS]

Two bars (README, "What the demo shows"), each per set as (overall, every question type): the
promise, which `make demo` (seed 0) and the other seeds measured meet, and the goal the demo is
built towards (image VQA 0.95 overall and 0.90 on every type, video `direction` 0.95, in at most
10 minutes); the report prints the time beside the bars, since it moves with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# bar -> set -> (minimum overall accuracy, minimum accuracy of every question type)
BARS = {
    "promise": {"vqa_image_test": (0.85, 0.70), "vqa_video_test": (0.90, 0.90)},
    "goal": {"vqa_image_test": (0.95, 0.90), "vqa_video_test": (0.95, 0.95)},
}


def check_bars(results: dict[str, dict]) -> list[str]:
    """One line per bar and set: its figures against the bar, 'met' or 'missed'."""
    lines = []
    for bar, sets in BARS.items():
        lines += check_bar(bar, sets, results)
    return lines


def check_bar(bar: str, sets: dict[str, tuple[float, float]], results: dict[str, dict]) -> list[str]:
    lines = []
    for name, (overall, per_type) in sets.items():
        res = results.get(name)
        if res is None:
            continue
        worst_type, worst = min(((k, r["acc"]) for k, r in res["by_type"].items()), key=lambda x: x[1])
        ok = res["overall"]["acc"] >= overall and worst >= per_type
        lines.append(
            f"{bar + ':':<9}{name}: overall {res['overall']['acc']:.3f} (>= {overall:.2f}), weakest "
            f"type {worst_type} {worst:.3f} (>= {per_type:.2f}): {'met' if ok else 'missed'}"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory fusion-eval wrote eval/ into")
    p.add_argument("--vqa", nargs="+", required=True, help="the VQA set directories that were evaluated")
    p.add_argument(
        "--started",
        type=float,
        default=None,
        metavar="EPOCH",
        help="when `make demo` started (seconds since the epoch): prints the time it took",
    )
    args = p.parse_args(argv)
    run = Path(args.run)
    lines = [f"{'set':<26}{'type':<12}{'n':>6}{'acc':>8}{'blind':>8}{'chance':>8}"]
    results = {}
    for vqa in args.vqa:
        name = Path(vqa).name
        path = run / "eval" / f"{name}.json"
        if not path.is_file():
            print(f"demo_report: error: no evaluation at {path}", file=sys.stderr)
            return 1
        res = results[name] = json.loads(path.read_text())
        rows = [("overall", res["overall"])] + sorted(res["by_type"].items())
        for kind, r in rows:
            blind = "-" if r.get("blind_acc") is None else f"{r['blind_acc']:.3f}"  # fusion-eval --no-blind
            lines.append(f"{name:<26}{kind:<12}{r['n']:>6}{r['acc']:>8.3f}{blind:>8}{r['chance']:>8.3f}")
        lines.append("")
    print("\n".join(lines).rstrip())
    bars = check_bars(results)
    if bars:
        print("\n" + "\n".join(bars))
    if args.started is not None:
        seconds = time.time() - args.started
        print(f"\nmake demo took {int(seconds // 60)} min {int(seconds % 60)} s")
    print(
        f"\nrun: {run}   metrics: {run / 'metrics.jsonl'}   plots: {run / 'plots'}   "
        f"examples: {run / 'eval'}/*.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
