"""Samples and splits: one sample of each kind per index, the splits and their sizes, shard
writing, the word-level tokenizer of the world's text, and the output directory's checks.
(fusion/data/toy/__init__.py describes the world.)"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fusion.data.shards import foreign_shards, shard_origin
from fusion.data.tar import ShardWriter
from fusion.data.tokenizer_train import (
    UNKNOWN_WORD,
    WORD_PATTERN,
    save_tokenizer,
    word_level_tokenizer,
)
from fusion.data.toy.language import (
    FACTS,
    describe_event,
    describe_scene,
    make_event,
    make_image_question,
    make_motion,
    qa_text,
    question_pair,
    scene_question,
)
from fusion.data.toy.scenes import encode_mp4, encode_png, place_scene, render_image, render_video, video_meta
from fusion.data.toy.world import (
    CHOICES,
    COLOR_NAMES,
    IMAGE_TYPES,
    QUESTIONS,
    SHAPES,
    VIDEO_EVENTS,
    VIDEO_TYPES,
    World,
)

# ---------------------------------------------------------------- samples


def _rng(world: World, split: str, i: int) -> random.Random:
    return random.Random(f"{world.seed}-{split}-{i}")


def cycle(i: int, types: Sequence[str]) -> tuple[str, str]:
    """(type, answer) of sample i: types cycle fastest, each type's answers cycle in turn."""
    qtype = types[i % len(types)]
    choices = CHOICES[qtype]
    return qtype, choices[(i // len(types)) % len(choices)]


def compositional_answers(world: World, qtype: str) -> list[str]:
    """The answers a compositional question of `qtype` can have (the held-out colours/shapes)."""
    if qtype == "color":
        return [c for c, _ in world.held_out]
    if qtype == "shape":
        return [s for _, s in world.held_out]
    return CHOICES[qtype]


def text_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    s = world.size
    kind = rng.choices(("caption", "qa", "event", "fact"), weights=(30, 45, 15, 10))[0]
    meta: dict = {"source": "toy", "kind": kind}
    if kind == "caption":
        n = rng.randint(1, 4)
        scene = place_scene(rng, s, [rng.choice(world.scenery) for _ in range(n)])
        text, meta["scene"] = describe_scene(rng, scene, s), scene
    elif kind == "qa":
        qtype = rng.choice(IMAGE_TYPES + VIDEO_TYPES)
        answer = rng.choice(CHOICES[qtype])
        if qtype == "direction":
            pair = rng.choice(world.seen)
            scene, event = make_motion(rng, world, pair, answer, rng.randint(0, 2), world.seen)
            context = describe_event(rng, scene, event, s)
            question = QUESTIONS["direction"].format(color=pair[0], shape=pair[1])
            meta["event"] = event
        else:
            scene, question = make_image_question(rng, world, qtype, answer, training=True)
            context = describe_scene(rng, scene, s)
        text = f"{context} {qa_text(question, answer)}"
        meta.update({"scene": scene, "type": qtype, "question": question, "answer": answer})
    elif kind == "event":
        scene, event = make_event(rng, world, rng.choice(VIDEO_EVENTS), rng.randint(*world.n_frames))
        text = describe_event(rng, scene, event, s)
        meta.update({"scene": scene, "event": event})
    else:
        text = rng.choice(FACTS)
    return {"txt": text, "json": meta}


def image_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    n = rng.randint(1, 4)
    scene = place_scene(rng, world.size, [rng.choice(world.scenery) for _ in range(n)])
    return {
        "png": encode_png(render_image(scene, world.size)),
        "txt": describe_scene(rng, scene, world.size),
        "json": {"width": world.size, "height": world.size, "source": "toy", "scene": scene},
    }


def _clip(world: World, scene: list[dict], event: dict, n_frames: int) -> tuple[bytes, dict]:
    data = encode_mp4(render_video(scene, event, n_frames, world.size))
    meta = video_meta(data)
    if meta["n_frames"] != n_frames:
        raise RuntimeError(f"encoded {n_frames} frames, decoded {meta['n_frames']}")
    return data, meta


def video_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    n_frames = rng.randint(*world.n_frames)
    scene, event = make_event(rng, world, VIDEO_EVENTS[i % len(VIDEO_EVENTS)], n_frames)
    caption = describe_event(rng, scene, event, world.size)
    data, meta = _clip(world, scene, event, n_frames)
    return {"mp4": data, "txt": caption, "json": {**meta, "source": "toy", "scene": scene, "event": event}}


def vqa_image_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    compositional = split.endswith("compositional")
    if compositional:
        qtype = IMAGE_TYPES[i % len(IMAGE_TYPES)]
        answers = compositional_answers(world, qtype)
        answer = answers[(i // len(IMAGE_TYPES)) % len(answers)]
    else:
        qtype, answer = cycle(i, IMAGE_TYPES)
    scene, question = make_image_question(
        rng, world, qtype, answer, compositional, training=split == "vqa_image_train"
    )
    first = {"question": question, "answer": answer, "choices": CHOICES[qtype], "type": qtype}
    meta = dict(first)
    if split == "vqa_image_train" and world.vqa_turns > 1:
        # a conversation about the picture: the balanced first question, then up to
        # vqa_turns - 1 more, one per other type that has a right answer in this scene
        # whose answer the earlier turns do not already give away
        turns = [first]
        named = {question_pair(qtype, question, answer)} - {None}
        others = [t for t in IMAGE_TYPES if t != qtype]
        rng.shuffle(others)
        for other in others:
            if len(turns) == world.vqa_turns:
                break
            asked = scene_question(rng, world, scene, other, named)
            if asked is not None:
                turns.append(
                    {"question": asked[0], "answer": asked[1], "choices": CHOICES[other], "type": other}
                )
                named |= {asked[2]} - {None}
        meta["turns"] = turns
    return {
        "png": encode_png(render_image(scene, world.size)),
        "json": {**meta, "width": world.size, "height": world.size, "source": "toy", "scene": scene},
    }


def vqa_video_sample(world: World, split: str, i: int) -> dict:
    rng = _rng(world, split, i)
    qtype, answer = cycle(i, VIDEO_TYPES)
    n_frames = rng.randint(*world.n_frames)
    pair = rng.choice(world.seen)
    scene, event = make_motion(rng, world, pair, answer, rng.randint(0, 2), world.seen)
    data, meta = _clip(world, scene, event, n_frames)
    question = QUESTIONS["direction"].format(color=pair[0], shape=pair[1])
    return {
        "mp4": data,
        "json": {
            "question": question,
            "answer": answer,
            "choices": CHOICES[qtype],
            "type": qtype,
            **meta,
            "source": "toy",
            "scene": scene,
            "event": event,
        },
    }


# ---------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    name: str  # directory under --output
    modality: str  # the shard kind (docs/shards.md)
    count_arg: str  # generate_toy argument giving its size
    make: Callable[[World, str, int], dict]
    types: tuple[str, ...] = ()


SPLITS = (
    Split("text", "text", "n_text", text_sample),
    Split("image", "image", "n_image", image_sample),
    Split("video", "video", "n_video", video_sample),
    Split("vqa_image_train", "vqa", "n_vqa_train", vqa_image_sample, IMAGE_TYPES),
    Split("vqa_image_test", "vqa", "n_vqa_test", vqa_image_sample, IMAGE_TYPES),
    Split("vqa_image_compositional", "vqa", "n_vqa_compositional", vqa_image_sample, IMAGE_TYPES),
    Split("vqa_video_train", "vqa", "n_video_vqa_train", vqa_video_sample, VIDEO_TYPES),
    Split("vqa_video_test", "vqa", "n_video_vqa_test", vqa_video_sample, VIDEO_TYPES),
)
SPLITS_BY_NAME = {sp.name: sp for sp in SPLITS}
VIDEO_SPLITS = ("video", "vqa_video_train", "vqa_video_test")


def sample_key(split: str, i: int) -> str:
    return f"{split}-{i:06d}"


def count_types(split: Split, n: int) -> dict[str, int]:
    """Samples per question type in the first n samples of a VQA split (types cycle with i)."""
    return {t: len(range(k, n, len(split.types))) for k, t in enumerate(split.types)}


STATS_SOURCE = "toy"  # in every toy shard's stats: what marks a shard as this generator's


def write_toy_shard(
    world: World, output: str, split_name: str, shard: int, start: int, stop: int
) -> set[str]:
    """Samples [start, stop) of a split into shard `shard` of DIR/split; returns the words of
    their text (captions, questions, answers, choices) for the toy tokenizer."""
    split = SPLITS_BY_NAME[split_name]
    words: set[str] = set()
    stats = {"source": STATS_SOURCE}
    with ShardWriter(Path(output) / split.name, shard, extra_stats=stats) as writer:
        for i in range(start, stop):
            sample = split.make(world, split.name, i)
            words.update(text_words(sample))
            writer.write(sample_key(split.name, i), sample)
    return words


# The toy tokenizer is `fusion-data tokenizer --kind word`'s (fusion/data/tokenizer_train.py):
# words are runs of word characters or of punctuation, so "triangle?" is two tokens.
TOKENIZER_FILE = "tokenizer.json"


def text_words(sample: dict) -> set[str]:
    """Every word of a toy sample's text: the caption, and a VQA question, answer and choices."""
    meta = sample.get("json") or {}
    texts = [
        sample.get("txt", ""),
        meta.get("question", ""),
        meta.get("answer", ""),
        *meta.get("choices", ()),
    ]
    for turn in meta.get("turns", ()):
        texts += [turn["question"], turn["answer"], *turn["choices"]]
    return {w for text in texts for w in WORD_PATTERN.findall(text)}


def write_toy_tokenizer(path: Path, words: set[str]) -> None:
    """A word-level Hugging Face tokenizer.json over the toy world's words: one token per word or
    punctuation run (a VQA answer is one token), anything else the unknown token, and fusion's
    special tokens stored in it so their ids are fixed. Same words, same bytes."""
    fixed = {w for t in QUESTIONS.values() for w in WORD_PATTERN.findall(t.format(color="", shape=""))}
    fixed |= {w for choices in CHOICES.values() for w in choices} | set(COLOR_NAMES) | set(SHAPES)
    save_tokenizer(word_level_tokenizer(words | fixed | {str(d) for d in range(10)}), path)


_SHARD_FILE = re.compile(r"^(\d{6})(\.tar|_stats\.json)$")


def remove_stale_shards(directory: Path, n_shards: int) -> None:
    """Drop shards (and their stats) numbered n_shards and up, left by a larger earlier run."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        m = _SHARD_FILE.match(path.name)
        if m and int(m.group(1)) >= n_shards:
            path.unlink()
    if n_shards == 0:
        (directory / "index.json").unlink(missing_ok=True)


def check_toy_output(output: Path) -> None:
    """ValueError, before anything is written, when `output` holds files a toy run would overwrite
    or delete that this generator did not write: shards in a split directory whose stats lack
    `source: toy` (a `fusion-data text` build, img2dataset, a plain tar), or a tokenizer.json
    that is not a toy word-level tokenizer. A toy world of any seed and size is fine."""
    for split in SPLITS:
        directory = output / split.name
        foreign = foreign_shards(directory, lambda stats: stats.get("source") == STATS_SOURCE)
        if foreign:
            names = ", ".join(n for n, _ in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(
                f"'{directory}' holds {len(foreign)} shard(s) the toy generator did "
                f"not write ({names}: {shard_origin(foreign[0][1])}); give another "
                f"--output, or move them away"
            )
    tokenizer = output / TOKENIZER_FILE
    if tokenizer.exists():
        try:
            model = json.loads(tokenizer.read_text())["model"]
            ours = model["type"] == "WordLevel" and model["unk_token"] == UNKNOWN_WORD
        except (OSError, ValueError, LookupError, TypeError):
            ours = False
        if not ours:
            raise ValueError(
                f"'{tokenizer}' is not a toy tokenizer and would be overwritten; "
                f"give another --output, or move it away"
            )
