"""fusion-convert: Hugging Face Llama 4 text checkpoints in and out (this module: the two
directions, `from_hf` and `to_hf`, and the command line).

    fusion-convert from-hf HF_DIR OUT_DIR        # then fusion.load_model(OUT_DIR)
    fusion-convert to-hf RUN_OR_CKPT OUT_DIR     # then Llama4ForCausalLM.from_pretrained(OUT_DIR)

from-hf reads `config.json` and safetensors (one file, or shards listed in
`model.safetensors.index.json`) of a `Llama4ForCausalLM`, a bare `Llama4TextModel`, or the text part
of a `Llama4ForConditionalGeneration`, and writes a fusion model directory (`model.safetensors` +
`model.json`, the format `fusion.checkpoint.export_model` writes). The vision tower, which the
Hugging Face vision model does not map onto, starts from random weights. to-hf writes `config.json`
+ `model.safetensors` of a `Llama4ForCausalLM` (the decoder only). Pickled weights (`*.bin`,
`*.pt`) are never read. Tensors are streamed one at a time, so memory stays near one tensor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from fusion.config import model_overrides, moe_layer_ids
from fusion.convert import weights as weight_map
from fusion.convert.errors import ConvertError
from fusion.convert.hf_config import (
    CONFIG,
    hf_config_from_model,
    model_overrides_from_hf,
    read_hf_text_config,
)
from fusion.convert.tensor_files import WEIGHTS, Entry, SafeTensorsDir, write_safetensors
from fusion.convert.weights import count_experts, entries_from_hf, entries_to_hf, hf_prefixes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_out_dir(out: Path, names: tuple[str, ...], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"OUT_DIR {out} exists and is not a directory")
    clash = [n for n in names if (out / n).exists()]
    if clash and not force:
        raise ConvertError(f"OUT_DIR {out} already holds {', '.join(clash)}; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _hf_tokenizer(hf_dir: Path, vocab_size: int):
    """(tokenizer spec, tokenizer) for a Hugging Face checkpoint: its tokenizer.json, else fusion's
    byte tokenizer; refuses one that needs more ids than the checkpoint's vocab_size."""
    from fusion.data.tokenizer import build_tokenizer

    tok_spec = "byte"
    if (hf_dir / "tokenizer.json").is_file():
        tok_spec = "tokenizer.json"
    tokenizer = build_tokenizer(str(hf_dir / tok_spec) if tok_spec != "byte" else "byte")
    if tokenizer.vocab_size > vocab_size:
        raise ConvertError(
            f"{hf_dir}: the tokenizer needs {tokenizer.vocab_size} ids (fusion's special tokens "
            f"appended) but vocab_size is {vocab_size}"
            + ("" if tok_spec != "byte" else "; add the checkpoint's tokenizer.json")
        )
    return tok_spec, tokenizer


def _fusion_entries(weights: SafeTensorsDir, m, expected: dict, seed: int, dtype: str) -> list[Entry]:
    """The fusion model's tensors to write, sorted by name: the decoder's from the Hugging Face
    checkpoint, the vision tower's fresh (seeded), each in the dtype it is stored in."""
    from fusion.model.vision import VisionTower

    makers = entries_from_hf(weights, m, expected)

    # the vision tower has no Hugging Face counterpart here: fresh weights, seeded
    torch.manual_seed(seed)
    tower = VisionTower(m.vision, m.dim, m.init_std)
    for k, v in tower.state_dict().items():
        makers[f"vision.{k}"] = lambda v=v: v
    missing = sorted(k for k in expected if k not in makers)
    assert not missing, f"no source for {len(missing)} model tensors, e.g. {missing[:3]}"

    # decoder tensors keep the checkpoint's dtype (or --dtype); the fresh vision tower is fp32
    stored = weights.dtype(hf_prefixes(weights)[0] + "embed_tokens.weight")
    target = DTYPES[dtype] if dtype else None
    entries = []
    for name in sorted(expected):
        shape, model_dtype = expected[name]
        if name.endswith("expert_bias"):
            out_dtype = torch.float32
        elif name.startswith("decoder."):
            out_dtype = target or stored
        else:
            out_dtype = target or model_dtype
        entries.append(Entry(name, shape, out_dtype, makers[name]))
    return entries


def from_hf(
    hf_dir: str | Path, out_dir: str | Path, dtype: str = "", seed: int = 0, force: bool = False, log=print
) -> Path:
    """Hugging Face Llama 4 text checkpoint -> fusion model directory. Returns the directory."""
    from fusion.config import ConfigError, load_config, to_dict
    from fusion.model.fusion import FusionModel
    from fusion.schema import SpecialIds

    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"HF_DIR {hf_dir} is not a directory")
    tc, arch = read_hf_text_config(hf_dir)
    values = model_overrides_from_hf(tc, hf_dir / CONFIG)
    weights = SafeTensorsDir(hf_dir)
    if hf_prefixes(weights)[1] is None and not values["tie_embeddings"]:
        log(
            f"note: {hf_dir} has no lm_head (a bare Llama4TextModel): the output head is tied to the "
            "input embeddings"
        )
        values["tie_embeddings"] = True

    tok_spec, tokenizer = _hf_tokenizer(hf_dir, values["vocab_size"])
    overrides = model_overrides(values)
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        raise ConvertError(f"{hf_dir / CONFIG}: {e}") from None
    m = cfg.model

    # the model's own key set, shapes and dtypes, without allocating it
    with torch.device("meta"):
        skeleton = FusionModel(m, values["vocab_size"], SpecialIds.of(tokenizer))
    expected = {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    entries = _fusion_entries(weights, m, expected, seed, dtype)

    _check_out_dir(out, (WEIGHTS, "model.json"), force)
    write_safetensors(out / WEIGHTS, entries)
    meta = {
        "model": to_dict(cfg)["model"],
        "tokenizer": tok_spec,
        "vocab_size": values["vocab_size"],
        "source": {"format": "huggingface", "architecture": arch, "path": str(hf_dir.resolve())},
    }
    if tok_spec != "byte":
        shutil.copyfile(hf_dir / tok_spec, out / tok_spec)
    (out / "model.json").write_text(json.dumps(meta, indent=1))

    written = SafeTensorsDir(out)
    n_hf, n_fu = count_experts(weights, "hf"), count_experts(written, "fusion")
    if n_hf != n_fu:
        raise ConvertError(f"{hf_dir} holds {n_hf} routed experts but {n_fu} were written")
    n_moe = len(moe_layer_ids(m.n_layers, m.moe.every, m.moe.n_experts))
    log(
        f"from-hf: {arch} {hf_dir} -> {out}: {m.n_layers} layers ({n_moe} MoE), {n_fu} routed experts "
        f"+ {n_moe} shared, vocab {values['vocab_size']}, tokenizer {tok_spec}"
    )
    return out


def _read_fusion_model(run_or_ckpt: str | Path):
    """(model dir, model config, vocab size, tokenizer file or None, tokenizer) of a fusion model
    directory, run or checkpoints dir: a training checkpoint's files verified against its manifest,
    model.json read and checked."""
    from fusion.checkpoint import (
        MANIFEST,
        TOKENIZER,
        CheckpointError,
        find_model_dir,
        read_model_json,
        verify_checkpoint,
    )
    from fusion.config import ConfigError, load_config
    from fusion.data.tokenizer import build_tokenizer

    try:
        model_dir = find_model_dir(run_or_ckpt)
        if (model_dir / MANIFEST).is_file():  # a training checkpoint: its files as saved
            verify_checkpoint(model_dir, only=[WEIGHTS, "model.json", TOKENIZER])
        meta = read_model_json(model_dir)
    except (FileNotFoundError, CheckpointError) as e:
        raise ConvertError(str(e)) from None
    where = model_dir / "model.json"
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ConvertError(f"{where}: key 'vocab_size' is missing or not a positive integer")
    try:
        # the vision tower's pretrained file is neither exported nor needed
        cfg = load_config(None, model_overrides(meta["model"]) + ['model.vision.checkpoint=""'], source="it")
    except ConfigError as e:
        raise ConvertError(f"{where}: {e}") from None
    tok_spec = meta["tokenizer"]
    tok_path = None
    if tok_spec not in ("", "byte"):
        tok_path = model_dir / tok_spec if (model_dir / tok_spec).is_file() else Path(tok_spec)
        if not tok_path.is_file():
            raise ConvertError(f"{where}: tokenizer {tok_spec} not found")
    try:
        tokenizer = build_tokenizer(str(tok_path) if tok_path else "byte")
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None
    return model_dir, cfg.model, vocab, tok_path, tokenizer


def to_hf(
    run_or_ckpt: str | Path,
    out_dir: str | Path,
    dtype: str = "",
    force: bool = False,
    ignore_router_bias: bool = False,
    log=print,
) -> Path:
    """A fusion model directory (or run / checkpoints dir) -> Hugging Face `Llama4ForCausalLM` dir."""
    from fusion.checkpoint import CheckpointError, check_weight_shapes
    from fusion.model.fusion import FusionModel
    from fusion.schema import SpecialIds

    model_dir, m, vocab, tok_path, tokenizer = _read_fusion_model(run_or_ckpt)
    hf_cfg = hf_config_from_model(m, vocab, SpecialIds.of(tokenizer))

    src = SafeTensorsDir(model_dir)
    with torch.device("meta"):  # the shapes model.json promises, without allocating them
        skeleton = FusionModel(m, vocab, SpecialIds.of(tokenizer))
    try:
        check_weight_shapes(
            model_dir / WEIGHTS,
            {k: src.shape(k) for k in src.keys()},
            {k: tuple(v.shape) for k, v in skeleton.state_dict().items()},
        )
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    biased = [k for k in src.keys() if k.endswith("router.expert_bias") and src.get(k).abs().max() > 0]
    if biased and not ignore_router_bias:
        raise ConvertError(
            f"{model_dir}: {len(biased)} MoE layers carry a trained aux-loss-free routing bias "
            "(model.moe.balance=bias), which a Hugging Face Llama 4 router cannot hold; pass "
            "--ignore-router-bias to export without it (expert choices will differ)"
        )
    if biased:
        log(f"warning: dropping the routing bias of {len(biased)} MoE layers")
    n_vision = sum(1 for k in src.keys() if k.startswith("vision."))
    entries = entries_to_hf(src, m, DTYPES[dtype] if dtype else None)
    hf_cfg["torch_dtype"] = str(entries[0].dtype).removeprefix("torch.")

    _check_out_dir(out_dir := Path(out_dir), (CONFIG, WEIGHTS), force)
    write_safetensors(out_dir / WEIGHTS, entries)
    (out_dir / CONFIG).write_text(json.dumps(hf_cfg, indent=2))
    if tok_path is not None:
        shutil.copyfile(tok_path, out_dir / "tokenizer.json")
    n_fu, n_hf = count_experts(src, "fusion"), count_experts(SafeTensorsDir(out_dir), "hf")
    if n_fu != n_hf:
        raise ConvertError(f"{model_dir} holds {n_fu} routed experts but {n_hf} were written")
    note = f"; {n_vision} vision tensors not exported (text decoder only)" if n_vision else ""
    log(
        f"to-hf: {model_dir} -> {out_dir}: Llama4ForCausalLM, {m.n_layers} layers, {n_hf} routed experts{note}"
    )
    return out_dir


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fusion-convert",
        description=__doc__,
        epilog=weight_map.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{from-hf,to-hf}")
    a = sub.add_parser("from-hf", help="Hugging Face Llama 4 text checkpoint -> fusion model directory")
    a.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and safetensors weights")
    a.add_argument(
        "out_dir", metavar="OUT_DIR", help="fusion model directory to write (fusion.load_model reads it)"
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the fresh vision-tower weights (default 0)")
    b = sub.add_parser("to-hf", help="fusion model -> Hugging Face Llama4ForCausalLM directory")
    b.add_argument(
        "src", metavar="RUN_OR_CKPT", help="a run dir, its checkpoints/ dir, or a checkpoint / model dir"
    )
    b.add_argument(
        "out_dir", metavar="OUT_DIR", help="directory to write config.json + model.safetensors into"
    )
    b.add_argument(
        "--ignore-router-bias",
        action="store_true",
        help="export even though MoE layers carry an aux-loss-free routing bias (it is dropped)",
    )
    for s in (a, b):
        s.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default="",
            help="store weights in this dtype (default: as stored in the source)",
        )
        s.add_argument("--force", action="store_true", help="overwrite weights already in OUT_DIR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from fusion.cli import pipe_safe

    return pipe_safe(lambda: _main(argv))  # `fusion-convert ... | head`: no traceback


def _main(argv) -> int:
    try:
        args = parse_args(argv)
        if args.cmd == "from-hf":
            from_hf(args.hf_dir, args.out_dir, dtype=args.dtype, seed=args.seed, force=args.force)
        else:
            to_hf(
                args.src,
                args.out_dir,
                dtype=args.dtype,
                force=args.force,
                ignore_router_bias=args.ignore_router_bias,
            )
    except BrokenPipeError:  # an OSError too: for pipe_safe
        raise
    except (ConvertError, OSError) as e:  # OSError: e.g. a missing file, no permission
        print(f"fusion-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
