"""Write docs/config.md, the reference of every configuration key, from the dataclasses themselves
(fusion/config/fields.py: each field's type, default and the comment beside it) and the named sizes
(fusion/config/sizes.py), so the reference cannot drift from the code.

    .venv/bin/python tools/config_reference.py           # rewrite docs/config.md
    .venv/bin/python tools/config_reference.py --check   # exit 1 if docs/config.md is stale (make lint)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion.config import SIZES, Config, fields  # noqa: E402

OUT = ROOT / "docs" / "config.md"

HEADER = """# Configuration reference

Every key of a run's configuration, with its type, its default and what it means. Generated from
`fusion/config/fields.py` and `fusion/config/sizes.py` by `tools/config_reference.py`; `make lint`
fails when this file is stale.

Order of precedence (last wins): the defaults below, then the named size `model.size`, then the YAML
file given with `--config` (it holds only overrides; see `configs/`), then `key.sub=value` overrides on
the command line. Unknown keys and wrong types stop the run with one line naming the key and where it
came from. A run's own `config.yaml` (its resolved config, with a `_meta` provenance section that is
ignored) loads back as `--config`. `train.deepspeed` takes extra DeepSpeed keys, as a whole mapping or
one key at a time (`train.deepspeed.zero_optimization.overlap_comm=true`).
"""


def field_comments(cls) -> dict[str, str]:
    """The comment beside each field of dataclass `cls`, with the comment lines right below it whose
    text is indented ("#   ...": continuations; a plain "# ..." line is a heading)."""
    lines = inspect.getsource(cls).splitlines()
    body = ast.parse("\n".join(lines)).body[0].body
    out: dict[str, str] = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        code, _, comment = _split_comment(lines[node.lineno - 1])
        if not comment:
            continue
        parts = [comment]
        for line in lines[node.end_lineno :]:  # continuations: "#   more", indented in the comment
            if line.strip().startswith("#   "):
                parts.append(line.strip().lstrip("#").strip())
            else:
                break
        out[node.target.id] = " ".join(parts)
    return out


def _split_comment(line: str) -> tuple[str, str, str]:
    """(code, '#', comment) of a source line, ignoring '#' inside string literals."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i], "#", line[i + 1 :].strip()
    return line, "", ""


def type_name(t) -> str:
    if t in (int, float, str, bool, dict):
        return t.__name__
    origin = typing.get_origin(t)
    if origin is list:
        return f"list[{type_name(typing.get_args(t)[0])}]"
    return getattr(t, "__name__", str(t))


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value}`"


def section(prefix: str, cls) -> list[str]:
    """Table rows of `cls`'s leaf fields; nested dataclasses get sections of their own."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            nested.append((f"{prefix}.{f.name}", t))
            continue
        meaning = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}.{f.name}` | {type_name(t)} | {default_of(f)} | {meaning} |")
    out = [f"## `{prefix}`", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for name, sub in nested:
        out += section(name, sub)
    return out


def sizes_table() -> list[str]:
    keys = sorted({k for shape in SIZES.values() for k in shape if k != "moe"})
    moe_keys = sorted({k for shape in SIZES.values() for k in shape.get("moe", {})})
    head = ["size"] + [f"`{k}`" for k in keys] + [f"`moe.{k}`" for k in moe_keys]
    out = [
        "## Named sizes (`model.size`)",
        "",
        "Explicit `model.*` keys override a size's values; a blank cell keeps the default above.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, shape in SIZES.items():
        cells = [f"`{name}`"] + [str(shape.get(k, "")) for k in keys]
        cells += [str(shape.get("moe", {}).get(k, "")) for k in moe_keys]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def render() -> str:
    lines = [HEADER]
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        lines += section(f.name, hints[f.name])
    lines += sizes_table()
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="config_reference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not what this writes")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run .venv/bin/python tools/config_reference.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    assert fields  # the module whose dataclasses are documented
    sys.exit(main())
