"""Print the demo's toy-VQA table (accuracy beside blind and chance) and where its outputs are.

    python tools/demo_report.py --run runs/demo --vqa data/toy/vqa_image_test data/toy/vqa_video_test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory fusion-eval wrote eval/ into")
    p.add_argument("--vqa", nargs="+", required=True, help="the VQA set directories that were evaluated")
    args = p.parse_args(argv)
    run = Path(args.run)
    lines = [f"{'set':<26}{'type':<12}{'n':>6}{'acc':>8}{'blind':>8}{'chance':>8}"]
    for vqa in args.vqa:
        name = Path(vqa).name
        path = run / "eval" / f"{name}.json"
        if not path.is_file():
            print(f"demo_report: error: no evaluation at {path}", file=sys.stderr)
            return 1
        res = json.loads(path.read_text())
        rows = [("overall", res["overall"])] + sorted(res["by_type"].items())
        for kind, r in rows:
            lines.append(f"{name:<26}{kind:<12}{r['n']:>6}{r['acc']:>8.3f}{r['blind_acc']:>8.3f}{r['chance']:>8.3f}")
        lines.append("")
    print("\n".join(lines).rstrip())
    print(f"\nrun: {run}   metrics: {run / 'metrics.jsonl'}   plots: {run / 'plots'}   "
          f"examples: {run / 'eval'}/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
