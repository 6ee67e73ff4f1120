"""Token sequences: documents -> packed rows of `seq_len` with labels, positions and document ids.

A document of tokens d (length L) gives L-1 training pairs (input d[i], target d[i+1]). Rows are
filled greedily with pairs. A document that does not fit the rest of a row is split: its first
part ends the row, the rest starts the next row as a new segment (positions restart at 0 and it
cannot attend to its first part). Text may be split anywhere; media runs get their own rule when
they arrive. Attention never crosses documents: each segment has its own `doc_id`.

Row fields, each a list of length T: input_ids, labels (IGNORE where no loss), positions,
doc_ids (-1 on padding), sample_modality (0 text, 1 image, 2 video).
"""

from __future__ import annotations

import torch

IGNORE = -100
FIELDS = ("input_ids", "labels", "positions", "doc_ids", "sample_modality")


class Packer:
    """Streaming packer. Its state (the partial row) is plain JSON for exact resume."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.row = {f: [] for f in FIELDS}
        self.next_doc = 0      # doc ids count up within a row
        self.ready: list[dict] = []

    def add(self, tokens: list[int], modality: int = 0, loss_mask: list[bool] | None = None) -> None:
        """Add one document; complete rows accumulate in `self.ready`."""
        if len(tokens) < 2:
            return
        inputs, targets = tokens[:-1], tokens[1:]
        if loss_mask is not None:  # loss_mask[i] is about token i; a pair's target is tokens[i+1]
            targets = [t if m else IGNORE for t, m in zip(targets, loss_mask[1:])]
        start = 0
        while start < len(inputs):
            room = self.seq_len - len(self.row["input_ids"])
            take = min(room, len(inputs) - start)
            self.row["input_ids"] += inputs[start:start + take]
            self.row["labels"] += targets[start:start + take]
            self.row["positions"] += list(range(take))
            self.row["doc_ids"] += [self.next_doc] * take
            self.row["sample_modality"] += [modality] * take
            self.next_doc += 1
            start += take
            if len(self.row["input_ids"]) == self.seq_len:
                self._emit()

    def flush(self) -> None:
        """Pad and emit a partial row (end of a finite stream)."""
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
        self.row = {f: [] for f in FIELDS}
        self.next_doc = 0

    def state_dict(self) -> dict:
        return {"row": self.row, "next_doc": self.next_doc, "ready": self.ready}

    def load_state_dict(self, state: dict) -> None:
        self.row = {f: list(state["row"][f]) for f in FIELDS}
        self.next_doc = state["next_doc"]
        self.ready = [dict(r) for r in state["ready"]]


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows -> tensors (B, T) of dtype long."""
    return {f: torch.tensor([r[f] for r in rows], dtype=torch.long) for f in FIELDS}
