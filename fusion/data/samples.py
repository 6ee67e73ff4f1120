"""Raw shard samples -> model-ready samples (tokens with placeholder runs + uint8 pixels).

One function per kind, chosen by the members a sample holds (docs/shards.md):
- text:          `.txt`                              -> the document
- image-caption: `.jpg|.png|.webp` + `.txt`          -> caption after (or before) the image
- video-caption: `.mp4` + `.txt` [+ `.json`]         -> caption after (or before) the frames
- vqa:           media + `.json` {question, answer}  -> media, then "Q: {question} A: {answer}"
                 or {turns: [{question, answer}, ...]}  -> media, then "Q: .. A: .. <eos>" per turn

A video's frame count, fps, duration and size come from its `.json` when that holds all five
(VIDEO_FIELDS, as the video builder writes them); otherwise the video is probed (`video.probe`,
the configured backend): a vqa `.json` carries none of them, nor need a shard written elsewhere.

A sample that cannot be used returns None (the stream counts it); the reason goes to the counter.
Pixels stay uint8 numpy arrays (3, S, S) / (F, 3, S, S) until collation makes tensors and the
model normalises them: 4x less to move than floats, cheap to send from DataLoader workers, and a
compact checkpoint of the packer's partial rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import numpy as np

from fusion.config import Config
from fusion.data.sequence import build_sample
from fusion.schema import tokens_per_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# what a video .json says about its clip (docs/shards.md, video); missing from it -> probed
VIDEO_FIELDS = ("n_frames", "fps", "duration", "width", "height")


ANSWER_CUE = " A:"  # the text right before every answer


def vqa_question(question: str) -> str:
    return f" Q: {question.strip()}"


def vqa_prompt(question: str) -> str:
    """The text before the answer when the media comes first, shared by training and evaluation."""
    return vqa_question(question) + ANSWER_CUE


def vqa_prompt_parts(part: tuple, question: str, where: str = "after") -> list:
    """`build_sample` parts of a question about the media run `part`, up to the answer: the
    media, then " Q: {question} A:" (`data.question=after`); or " Q: {question}", the media,
    " A:" (`before`: the media's tokens can then attend to the question)."""
    if where == "before":
        return [vqa_question(question), part, ANSWER_CUE]
    return [part, vqa_prompt(question)]


def vqa_answer(answer: str) -> str:
    return f" {answer.strip()}"


def crop_box(
    width: int, height: int, size: int, train: bool, rng: random.Random
) -> tuple[float, float, float, float]:
    """The source region (left, top, right, bottom) that becomes the `size` x `size` square: the
    shorter side scaled to `size`, then the centre (or, when training, a random offset along the
    longer side). Offsets are drawn in the scaled picture's whole pixels."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    x0 = rng.randint(0, nw - size) if train else (nw - size) // 2
    y0 = rng.randint(0, nh - size) if train else (nh - size) // 2
    sx, sy = width / nw, height / nh  # scaled pixels -> source pixels
    return (x0 * sx, y0 * sy, (x0 + size) * sx, (y0 + size) * sy)


def _square(img, size: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """uint8 (S, S, 3) of `box` resized to size x size: one bicubic pass over the kept region (no
    full-picture resize, no crop copy); a box already size x size is cut out unchanged."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    left, top, right, bottom = box
    if right - left == size and bottom - top == size and float(left).is_integer() and float(top).is_integer():
        img = img.crop((int(left), int(top), int(right), int(bottom)))
    else:
        img = img.resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(img, dtype=np.uint8)  # (S, S, 3)


def square_pixels(img, size: int, train: bool, rng: random.Random) -> np.ndarray:
    """PIL image -> uint8 (3, size, size): shorter side to `size`, then a centre crop (or, when
    training, a crop at a random offset along the longer side). numpy, not torch: a DataLoader
    worker sends every torch tensor through its own shared-memory segment, which costs more than
    decoding a small picture (docs/benchmarks.md)."""
    box = crop_box(img.width, img.height, size, train, rng)
    return np.ascontiguousarray(_square(img, size, box).transpose(2, 0, 1))  # (3, S, S)


def square_frames(frames: np.ndarray, size: int, train: bool, rng: random.Random) -> np.ndarray:
    """uint8 (F, H, W, 3) frames -> (F, 3, size, size), every frame cut from the same region."""
    from PIL import Image

    n, height, width = frames.shape[:3]
    box = crop_box(width, height, size, train, rng)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        out[i] = _square(Image.fromarray(frames[i]), size, box).transpose(2, 0, 1)
    return out  # (F, 3, S, S)


def vqa_turns(meta: dict) -> list[tuple[str, str]] | str:
    """The (question, answer) turns of a VQA record's json, or the reason it has none usable.

    A record holds one question (`question`, `answer`) or a conversation about its media,
    `turns`: a list of {question, answer[, choices, type]}, asked in order (the top-level
    `question` / `answer`, when there too, repeat the first turn for readers of one question)."""
    if "turns" in meta:
        turns = meta["turns"]
        if not isinstance(turns, list) or not turns:
            return "bad_turns"
        out = []
        for turn in turns:
            if (
                not isinstance(turn, dict)
                or not isinstance(turn.get("question"), str)
                or "answer" not in turn
                or isinstance(turn["answer"], (dict, list))
            ):
                return "bad_turns"
            out.append((turn["question"], str(turn["answer"])))
        return out
    if "answer" not in meta:
        return "missing_answer"
    return [(str(meta["question"]), str(meta["answer"]))]


@dataclass
class SampleMaker:
    """Picklable (it travels to DataLoader workers); `__call__(raw) -> dict | None`."""

    cfg: Config
    tokenizer: object
    train: bool = True
    counter: object = None  # set by the stream: an ErrorCounter for reasons

    def _fail(self, reason: str):
        if self.counter is not None:
            self.counter(reason)
        return None

    def __call__(self, raw: dict) -> dict | None:
        key = raw.get("__key__", "")
        rng = random.Random(f"{self.cfg.train.seed}-{key}")
        media_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        meta = None
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError):
                return self._fail("bad_json")
            if not isinstance(meta, dict):
                return self._fail("bad_json")
        if media_ext is None and "mp4" not in raw:
            return self.text(raw)
        if media_ext is not None:
            media = self.image(raw[media_ext], rng)
        else:
            media = self.video(raw["mp4"], meta, rng)
        if media is None:
            return None
        part, pixels, modality = media
        if meta is not None and ("question" in meta or "turns" in meta):
            turns = vqa_turns(meta)
            if isinstance(turns, str):
                return self._fail(turns)
            out = self.vqa_tokens(part, turns)
            out["modality"] = modality
            out["images" if modality == 1 else "videos"] = [pixels]
            return out
        else:
            if len(raw.get("txt") or b"") > 16 * self.cfg.train.seq_len:  # can never fit a row
                return self._fail("caption_too_long")
            caption = self._caption(raw)
            if caption is None:
                return None
            before = self.cfg.data.caption == "before" or (
                self.cfg.data.caption == "random" and rng.random() < 0.5
            )
            parts = [caption, part] if before else [part, " " + caption]
        tokens, loss_mask, min_pairs = build_sample(self.tokenizer, parts)
        out = {"tokens": tokens, "loss_mask": loss_mask, "modality": modality, "min_pairs": min_pairs}
        out["images" if modality == 1 else "videos"] = [pixels]
        return out

    def vqa_tokens(self, part: tuple, turns: list[tuple[str, str]]) -> dict:
        """<bos> media, then " Q: {question} A: {answer}" <eos> for each turn (with
        `data.question=before`, the first turn's question comes before the media); every answer ends
        with eos, as the one answer of a single question does and as evaluation scores it (the
        answer's tokens and eos after the prompt), so the first turn of a conversation is trained
        exactly as a test question is asked. The loss is on every answer and its eos
        (`data.vqa_loss=answer`), or on all the text (`all`). Prompt and answer are encoded
        apart, as evaluation encodes them."""
        tok = self.tokenizer
        everything = self.cfg.data.vqa_loss == "all"
        first = vqa_prompt_parts(part, turns[0][0], self.cfg.data.question)
        tokens, loss_mask, min_pairs = build_sample(tok, first)
        tokens = tokens[:-1]  # without eos; bos and media carry no loss, prompt words with `all`
        loss_mask = [False] + [everything and m for m in loss_mask[1:-1]]
        for k, (question, answer) in enumerate(turns):
            prompt = [] if k == 0 else tok.encode(vqa_prompt(question))
            reply = tok.encode(vqa_answer(answer)) + [tok.eos_id]
            tokens += prompt + reply
            loss_mask += [everything] * len(prompt) + [True] * len(reply)
        return {"tokens": tokens, "loss_mask": loss_mask, "min_pairs": min_pairs}

    def _caption(self, raw: dict) -> str | None:
        data = raw.get("txt")
        if data is None:
            from fusion.data.shards import missing

            return self._fail(missing(raw, "txt", "missing_caption"))
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._fail("bad_utf8")
        return text if text else self._fail("empty_caption")

    def text(self, raw: dict) -> dict | None:
        text = self._caption(raw)
        if text is None:
            return None
        max_tokens = 64 * self.cfg.train.seq_len  # a 10 MB document is cut, not tokenised whole
        ids = self.tokenizer.encode(text[: max_tokens * 4])[: max_tokens - 2]
        return {"tokens": [self.tokenizer.bos_id] + ids + [self.tokenizer.eos_id], "modality": 0}

    def image(self, data: bytes, rng: random.Random):
        from fusion.data.images import open_image
        from fusion.data.shards import SampleError

        try:
            img = open_image(data, self.cfg.data.max_pixels)
        except SampleError as e:
            return self._fail(e.reason)
        pixels = square_pixels(img, self.cfg.model.vision.img_size, self.train, rng)
        return ("image", tokens_per_image(self.cfg.model.vision)), pixels, 1

    def video(self, data: bytes, meta: dict | None, rng: random.Random):
        from fusion.data.sampling import FrameSampling, VideoMeta, sample_frame_indices
        from fusion.data.video import VideoDecodeError, decode, probe

        d, v = self.cfg.data, self.cfg.model.vision
        meta = meta or {}
        try:
            if all(f in meta for f in VIDEO_FIELDS):
                vmeta = VideoMeta.from_json(meta)
            else:  # a vqa .json (docs/shards.md) has none; a plain-tarfile shard may lack some
                vmeta = probe(data, backend=d.video_backend, timeout=d.decode_timeout)
        except VideoDecodeError as e:
            return self._fail(f"video_{e.reason}")
        except ValueError:
            return self._fail("bad_video_json")
        strategy = d.frame_strategy
        if not self.train and strategy == "segment_random":
            strategy = "segment_middle"  # evaluation is deterministic
        sampling = FrameSampling(
            strategy=strategy,
            n_frames=d.n_frames,
            pad="repeat_last",
            min_frames=d.n_frames,
            max_frames=d.n_frames,
        )
        np_rng = np.random.default_rng(rng.getrandbits(63))
        try:
            idx = sample_frame_indices(vmeta, sampling, np_rng)
            frames = decode(data, idx, backend=d.video_backend, timeout=d.decode_timeout)
        except VideoDecodeError as e:
            return self._fail(f"video_{e.reason}")
        except ValueError:
            return self._fail("video_zero_frames")
        if len(frames) != d.n_frames:
            return self._fail("video_frame_count")
        crop_rng = random.Random(rng.random())  # one crop for every frame of the clip
        pixels = square_frames(np.asarray(frames), v.img_size, self.train, crop_rng)
        groups = d.n_frames // v.temporal_merge
        return ("video", groups, tokens_per_image(v)), pixels, 2  # (F, 3, S, S)
