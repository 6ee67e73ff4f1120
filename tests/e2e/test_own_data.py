"""A user's own images end to end: README.md "Train on your own images", run as written.

The test reads that section's commands (its ```bash block) and config (its ```yaml block, whose
first line names the file) from README.md and runs them through the real CLIs (fusion-data images,
vqa, tokenizer; fusion-train; fusion-eval) in a directory holding `mydata/`: pictures with captions
and multiple-choice questions that are not the toy world's. They are 48 px tiles of stripes,
checks or dots in one of four inks (teal, amber, violet, crimson) on a light or dark ground, some
PNG and some JPEG; the question types are `pattern`, `ink`, `ground` and `stripes` (which way the
stripes run). Answers are balanced per type, so the blind baseline (grey pictures) sits at chance.

It asserts the evaluation's overall accuracy is at least MARGIN above the blind baseline on 200
test questions about pictures kept out of training (README gives the numbers a run printed).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN, ROOT, run_cli

pytestmark = pytest.mark.slow

SECTION = "### Train on your own images"
MARGIN = 0.3  # overall accuracy - blind accuracy; a run gives about 0.5 (README)
TOOLS = [
    "fusion-data images",
    "fusion-data vqa",
    "fusion-data vqa",
    "fusion-data tokenizer",
    "fusion-train",
    "fusion-eval",
]

# ---------------------------------------------------------------- the pictures and questions

SIDE = 48
INKS = {"teal": (0, 150, 150), "amber": (235, 160, 20), "violet": (140, 60, 210), "crimson": (205, 30, 55)}
GROUNDS = {"light": (215, 215, 205), "dark": (28, 30, 36)}
PATTERNS = ("stripes", "checks", "dots")
DIRECTIONS = ("horizontal", "vertical")
QUESTIONS = {
    "pattern": ("What pattern covers the tile?", list(PATTERNS)),
    "ink": ("What colour is the ink?", list(INKS)),
    "ground": ("Is the ground light or dark?", list(GROUNDS)),
    "stripes": ("Which way do the stripes run?", list(DIRECTIONS)),
}
TYPES = tuple(QUESTIONS)


def draw(rng: random.Random, tile: dict) -> np.ndarray:
    """uint8 (SIDE, SIDE, 3): the tile's pattern in its ink on its ground, at a random scale and
    phase, each colour jittered a little."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    if tile["pattern"] == "stripes":
        period = rng.randint(8, 12)
        coord = y if tile["stripes"] == "horizontal" else x
        mask = (coord + rng.randrange(period)) % period < period // 2
    elif tile["pattern"] == "checks":
        cell = rng.randint(5, 8)
        mask = ((x + rng.randrange(cell)) // cell + (y + rng.randrange(cell)) // cell) % 2 == 0
    else:
        step = rng.randint(9, 12)
        dx = (x + rng.randrange(step)) % step - step / 2
        dy = (y + rng.randrange(step)) % step - step / 2
        mask = dx * dx + dy * dy <= 6.5

    def jitter(rgb):
        return np.clip(np.array(rgb) + rng.randint(-12, 12), 0, 255)

    img = np.empty((SIDE, SIDE, 3), np.uint8)
    img[:] = jitter(GROUNDS[tile["ground"]])
    img[mask] = jitter(INKS[tile["ink"]])
    return img


def caption(tile: dict) -> str:
    run = f" running {tile['stripes']}" if tile["pattern"] == "stripes" else ""
    return f"{tile['ink']} {tile['pattern']}{run} on a {tile['ground']} ground"


def make_dataset(root: Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> None:
    """root/pics/*.png|jpg, root/captions.jsonl (one caption per training picture), and
    root/vqa_train.jsonl / vqa_test.jsonl: two questions per picture, types in turn, each type's
    answers in turn (a `stripes` question makes its picture stripes)."""
    from PIL import Image

    (root / "pics").mkdir(parents=True)
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {"captions": [], "vqa_train": [], "vqa_test": []}
    asked = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            tile = {
                "pattern": rng.choice(PATTERNS),
                "ink": rng.choice(list(INKS)),
                "ground": rng.choice(list(GROUNDS)),
                "stripes": rng.choice(DIRECTIONS),
            }
            questions = []
            for t in (TYPES[(2 * i) % len(TYPES)], TYPES[(2 * i + 1) % len(TYPES)]):
                choices = QUESTIONS[t][1]
                tile[t] = choices[(asked // len(TYPES)) % len(choices)]
                tile["pattern"] = "stripes" if t == "stripes" else tile["pattern"]
                questions.append(t)
                asked += 1
            ext = "jpg" if i % 3 == 2 else "png"
            name = f"pics/{split}_{i:04d}.{ext}"
            Image.fromarray(draw(rng, tile)).save(root / name, quality=95)
            if split == "train":
                rows["captions"].append({"image": name, "caption": caption(tile)})
            for t in questions:
                question, choices = QUESTIONS[t]
                rows[f"vqa_{split}"].append(
                    {"image": name, "question": question, "answer": tile[t], "choices": choices, "type": t}
                )
    for name, records in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- the recipe, from README.md


def recipe() -> tuple[list[str], str, str]:
    """(commands, config file name, config text) from README.md's section SECTION."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    body = re.split(r"\n#{2,3} ", body, maxsplit=1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", body, re.S)
    commands = []
    for lang, code in blocks:
        if lang == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    commands.append(line)
    configs = [code for lang, code in blocks if lang == "yaml"]
    assert len(configs) == 1, "the section shows one config"
    first = configs[0].splitlines()[0]
    assert first.startswith("# ") and first.endswith(".yaml"), first
    return commands, first[2:].strip(), configs[0]


def test_readme_recipe_trains_on_own_images_above_the_blind_baseline(tmp_path):
    commands, config_name, config = recipe()
    assert [
        " ".join(shlex.split(c)[:2]) if c.startswith("fusion-data") else shlex.split(c)[0] for c in commands
    ] == TOOLS
    make_dataset(tmp_path / "mydata")
    (tmp_path / config_name).write_text(config)
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    seconds = []
    for command in commands:
        t0 = time.perf_counter()
        r = run_cli(["bash", "-c", command], cwd=tmp_path, env=env, timeout=1800)
        seconds.append((command.split(" --")[0], round(time.perf_counter() - t0, 1)))
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        if command.startswith("fusion-data"):
            assert "0 failed" in r.stdout or command.startswith("fusion-data tokenizer"), r.stdout
    print("seconds per command:", seconds)

    from fusion.config import load_config
    from fusion.data.tokenizer import build_tokenizer

    cfg = load_config(tmp_path / config_name)
    tok = build_tokenizer(str(tmp_path / cfg.data.tokenizer))
    for _, choices in QUESTIONS.values():  # every answer is one word-level token
        assert all(len(tok.encode(" " + c)) == 1 for c in choices)
    run = tmp_path / cfg.run.dir
    assert (run / "checkpoints" / "latest").exists()
    results = sorted((run / "eval").glob("*.json"))
    assert len(results) == 1, results
    result = json.loads(results[0].read_text())
    overall = result["overall"]
    print("overall", overall, {t: (s["acc"], s["blind_acc"]) for t, s in result["by_type"].items()})
    assert overall["n"] == 200 and set(result["by_type"]) == set(TYPES)
    assert overall["acc"] >= overall["blind_acc"] + MARGIN, result
    for t, s in result["by_type"].items():
        assert s["acc"] > s["chance"] + 0.1, (t, s)
