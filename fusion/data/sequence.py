"""Token sequences: samples with placeholder runs, and packing into rows of `seq_len`.

Media enter the token stream as placeholder runs (README: How media become tokens):

    image: <|image_start|> <|patch|>*N <|image_end|>
    video: <|video_start|> <|patch|>*N <|frame_sep|> <|patch|>*N ... <|video_end|>   (one run per frame group)

The model later replaces each <|patch|> by one vision embedding. Placeholders and markers carry no
loss (`loss_mask` False).

Packing: a sample of tokens d (length L) gives L-1 training pairs (input d[i], target d[i+1]).
Rows are filled greedily with pairs; each sample is its own attention segment (`doc_ids`) whose
positions start at 0.
- Text may be split anywhere: the rest of a long document starts the next row as a new segment.
- A sample with media is never split across rows: if it does not fit the rest of the row, the row
  is padded and emitted and the sample starts a new one. A media sample longer than `seq_len` is
  truncated after its last media run (text after the media is cut); when the media themselves do
  not fit in `seq_len`, the sample is dropped and counted in `Packer.dropped`.

Row fields, each a list of length T: input_ids, labels (IGNORE where no loss), positions,
doc_ids (-1 on padding), sample_modality (0 text, 1 image, 2 video); plus `images` and `videos`,
the uint8 pixels (numpy arrays or tensors) of the row's media in order of appearance.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from fusion.schema import IGNORE

FIELDS = ("input_ids", "labels", "positions", "doc_ids", "sample_modality")
MEDIA = ("images", "videos")


# ---------------------------------------------------------------------------------------------
# building one sample's tokens
# ---------------------------------------------------------------------------------------------


def image_run(tok, n_tokens: int) -> list[int]:
    return [tok.image_start_id] + [tok.patch_id] * n_tokens + [tok.image_end_id]


def video_run(tok, n_groups: int, n_tokens: int) -> list[int]:
    ids = [tok.video_start_id]
    for g in range(n_groups):
        if g:
            ids.append(tok.frame_sep_id)
        ids += [tok.patch_id] * n_tokens
    return ids + [tok.video_end_id]


def build_sample(tok, parts: list) -> tuple[list[int], list[bool], int]:
    """parts: strings, ("image", n_tokens) or ("video", n_groups, n_tokens), in stream order.

    Returns (tokens, loss_mask, min_pairs): bos/eos wrap the sample; `min_pairs` is how many
    training pairs must be kept so that every media token is an input (0 for text only).
    """
    tokens, mask = [tok.bos_id], [True]
    min_pairs = 0
    for part in parts:
        if isinstance(part, str):
            ids = tok.encode(part)
            tokens += ids
            mask += [True] * len(ids)
            continue
        kind = part[0]
        run = image_run(tok, part[1]) if kind == "image" else video_run(tok, part[1], part[2])
        tokens += run
        mask += [False] * len(run)
        min_pairs = len(tokens)  # the last media token is input index len-1: len pairs needed
    tokens.append(tok.eos_id)
    mask.append(True)
    return tokens, mask, min_pairs


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------


def _empty_row() -> dict:
    row = {f: [] for f in FIELDS}
    row.update(images=[], videos=[])
    return row


class Packer:
    """Streaming packer; `state_dict()` is plain JSON (media as base64 uint8) for exact resume."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.row = _empty_row()
        self.next_doc = 0  # doc ids count up within a row
        self.ready: list[dict] = []
        self.dropped = 0  # media samples whose media alone exceed seq_len

    def add(
        self,
        tokens: list[int],
        modality: int = 0,
        loss_mask: list[bool] | None = None,
        images: list = (),
        videos: list = (),
        min_pairs: int = 0,
    ) -> None:
        """Add one sample; complete rows accumulate in `self.ready`."""
        if len(tokens) < 2:
            return
        inputs, targets = tokens[:-1], tokens[1:]
        if loss_mask is not None:  # loss_mask[i] is about token i; a pair's target is tokens[i+1]
            targets = [t if m else IGNORE for t, m in zip(targets, loss_mask[1:])]
        has_media = bool(len(images) or len(videos) or min_pairs)
        if not has_media:
            self._add_splittable(inputs, targets, modality)
            return
        if min_pairs > self.seq_len:
            self.dropped += 1
            return
        inputs, targets = inputs[: self.seq_len], targets[: self.seq_len]
        if len(inputs) > self.seq_len - len(self.row["input_ids"]):
            self.flush()
        self._append(inputs, targets, modality)
        self.row["images"] += list(images)
        self.row["videos"] += list(videos)
        if len(self.row["input_ids"]) == self.seq_len:
            self._emit()

    def _add_splittable(self, inputs, targets, modality) -> None:
        start = 0
        while start < len(inputs):
            room = self.seq_len - len(self.row["input_ids"])
            take = min(room, len(inputs) - start)
            self._append(inputs[start : start + take], targets[start : start + take], modality)
            start += take
            if len(self.row["input_ids"]) == self.seq_len:
                self._emit()

    def _append(self, inputs, targets, modality) -> None:
        n = len(inputs)
        self.row["input_ids"] += inputs
        self.row["labels"] += targets
        self.row["positions"] += list(range(n))
        self.row["doc_ids"] += [self.next_doc] * n
        self.row["sample_modality"] += [modality] * n
        self.next_doc += 1

    def flush(self) -> None:
        """Pad and emit a partial row."""
        n = len(self.row["input_ids"])
        if n == 0:
            return
        pad = self.seq_len - n
        self.row["input_ids"] += [self.pad_id] * pad
        self.row["labels"] += [IGNORE] * pad
        self.row["positions"] += [0] * pad
        self.row["doc_ids"] += [-1] * pad
        self.row["sample_modality"] += [0] * pad
        self._emit()

    def _emit(self) -> None:
        self.ready.append(self.row)
        self.row = _empty_row()
        self.next_doc = 0

    def state_dict(self) -> dict:
        return {
            "row": _row_to_json(self.row),
            "next_doc": self.next_doc,
            "dropped": self.dropped,
            "ready": [_row_to_json(r) for r in self.ready],
        }

    def load_state_dict(self, state: dict) -> None:
        self.row = _row_from_json(state["row"])
        self.next_doc = state["next_doc"]
        self.dropped = state.get("dropped", 0)
        self.ready = [_row_from_json(r) for r in state["ready"]]


def _pixels_to_json(t) -> dict:
    arr = np.ascontiguousarray(np.asarray(t))
    return {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "b64": base64.b64encode(arr.tobytes()).decode(),
    }


def _pixels_from_json(d: dict) -> np.ndarray:
    arr = np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"]))
    return arr.copy().reshape(d["shape"])


def _row_to_json(row: dict) -> dict:
    out = {f: list(row[f]) for f in FIELDS}
    for m in MEDIA:
        out[m] = [_pixels_to_json(t) for t in row.get(m, [])]
    return out


def _row_from_json(d: dict) -> dict:
    row = {f: list(d[f]) for f in FIELDS}
    for m in MEDIA:
        row[m] = [_pixels_from_json(t) for t in d.get(m, [])]
    return row


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows -> tensors (B, T) of dtype long, plus `images` (N, 3, H, W) and `videos`
    (M, F, 3, H, W) uint8 in order of appearance (row-major), when the rows hold any."""
    # numpy first: torch.tensor on nested lists is several times slower
    batch = {f: torch.from_numpy(np.array([r[f] for r in rows], dtype=np.int64)) for f in FIELDS}
    for m in MEDIA:
        items = [np.asarray(t) for r in rows for t in r.get(m, [])]  # numpy or torch pixels
        if items:
            batch[m] = torch.from_numpy(np.stack(items))
    return batch
