"""fusion-eval: toy-VQA evaluation of a run or a checkpoint (the scoring is fusion/eval/vqa.py).

fusion-eval --run runs/demo --vqa data/toy/vqa_image_test data/toy/vqa_video_test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fusion.eval import vqa
from fusion.eval.questions import EvalError
from fusion.eval.report import format_table
from fusion.eval.runs import check_out_dir, check_sets, default_out_dir, load_for_eval, run_n_frames
from fusion.eval.vqa import MAX_NEW_TOKENS, evaluate_run


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


def _add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    """How the questions are scored and reported."""
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="(question, choice) rows per forward pass (default 16)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="evaluate only the first N usable questions of each set",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help=f"also greedy-generate up to {MAX_NEW_TOKENS} tokens and report exact-match gen_acc",
    )
    p.add_argument(
        "--no-blind", action="store_true", help="skip the blind (grey-media) baseline; blind_acc is then null"
    )
    p.add_argument(
        "--n-frames",
        type=int,
        default=None,
        metavar="N",
        help="frames sampled per video (default: the run's data.n_frames, else 8)",
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("cpu", "cuda"),
        help="where to run the model (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=16,
        metavar="N",
        help="questions shown in SET.png (default 16; 0: no picture)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--quantize",
        choices=("int4",),
        default=None,
        help="also evaluate with weight-only int4 linear and expert weights (fusion/eval/int4.py); "
        "SET.json gains an 'int4' section beside the unquantised result, with the weight "
        "memory of each",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=64,
        metavar="G",
        help="--quantize: weights per int4 scale/offset group, along the input axis (even; default 64)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fusion-eval",
        description=vqa.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  fusion-eval --run runs/demo --vqa data/toy/vqa_image_test data/toy/vqa_video_test",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="run directory: evaluates its latest checkpoint, writes RUN_DIR/eval/SET.json",
    )
    src.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a checkpoints/ dir (its latest), a checkpoints/step_N dir or a model dir "
        "(fusion-convert from-hf OUT)",
    )
    p.add_argument(
        "--vqa",
        nargs="+",
        required=True,
        metavar="DIR",
        help="VQA shard directories (media + .json {question, answer, choices, type}); each writes SET.json and SET.png, "
        "SET being the directory's name",
    )
    p.add_argument(
        "--out",
        metavar="OUT_DIR",
        help="where SET.json / SET.png go (default: the run's eval/ for a run, its "
        "checkpoints/ or a step_N dir; DIR/eval for another model dir; never inside "
        "a checkpoint)",
    )
    _add_scoring_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from fusion.cli import pipe_safe

    return pipe_safe(lambda: _main(argv))  # `fusion-eval ... | head`: no traceback


def _main(argv: list[str] | None) -> int:
    from fusion.config import ConfigError

    try:
        args = build_parser().parse_args(argv)
        for flag, value, low in (
            ("--batch-size", args.batch_size, 1),
            ("--limit", args.limit, 1),
            ("--n-frames", args.n_frames, 1),
            ("--examples", args.examples, 0),
        ):
            if value is not None and value < low:
                raise EvalError(f"{flag} must be >= {low}, got {value}")
        if args.quantize and (args.group_size < 2 or args.group_size % 2):
            raise EvalError(f"--group-size must be an even number >= 2, got {args.group_size}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise EvalError("--device cuda: CUDA is not available")
        check_sets(args.vqa)
        source = args.run or args.checkpoint
        if not Path(source).exists():
            raise EvalError(f"{'--run' if args.run else '--checkpoint'} {source}: no such directory")
        out = check_out_dir(args.out) if args.out else None
        model, meta = load_for_eval(source, device)
        out = out or default_out_dir(meta["checkpoint"])
        results = evaluate_run(
            args.run,
            args.vqa,
            model=model,
            out_dir=out,
            step=meta.get("step"),
            checkpoint=meta["checkpoint"],
            batch_size=args.batch_size,
            limit=args.limit,
            generate=args.generate,
            blind=not args.no_blind,
            n_frames=args.n_frames or run_n_frames(meta["checkpoint"]) or 8,
            device=device,
            examples=args.examples,
            progress=not args.no_progress,
        )
        if args.quantize:  # the same sets again with int4 weights, written beside the result above
            from fusion.eval.int4 import add_int4_results

            add_int4_results(
                model,
                results,
                out,
                group_size=args.group_size,
                batch_size=args.batch_size,
                limit=args.limit,
                blind=not args.no_blind,
                device=device,
                progress=not args.no_progress,
            )
    except BrokenPipeError:
        raise
    except _UsageError as e:
        print(f"fusion-eval: error: {e} (see --help)", file=sys.stderr)
        return 2
    except (EvalError, ConfigError, OSError) as e:  # OSError: e.g. a missing file, no permission
        print(f"fusion-eval: error: {e}", file=sys.stderr)
        return 1
    for name, result in results.items():
        print(format_table(result))
        if "int4" in result:
            from fusion.eval.int4 import format_int4

            print(format_int4(result))
        print(f"-> {out / (name + '.json')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
