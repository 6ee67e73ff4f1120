"""Sample streams split by rank and worker, and the batcher that packs them into training rows.

A *sub-stream* is one (rank, worker) pair: id `sid = rank * W + worker` out of `R * W`. Each is an
endless, deterministic sequence of samples:

- epoch e shuffles the shard list with seed (seed, e), identically on every sub-stream;
- with at least as many shards as sub-streams, sub-stream `sid` reads shards `order[sid::R*W]`;
  with fewer, every sub-stream reads every shard and keeps samples `i % (R*W) == sid`, so no
  rank or worker is ever starved (webdataset #188, #225) and none sees another's samples;
- a shuffle buffer seeded by (seed, sid, e) mixes samples across shards.

The DataLoader hands out worker outputs round-robin, so the number of samples the main process
has consumed fixes how many each worker yielded. Resume replays each worker's stream and skips
that many raw samples without decoding them: the sequence after resume equals the uninterrupted
one. The packer's partial row is saved too.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fusion.data.sequence import Packer, collate
from fusion.data.shards import ErrorCounter, iter_samples, list_shards


def assigned_samples(urls: list[str], sid: int, n_sub: int, seed: int, epoch: int,
                     counter: ErrorCounter) -> Iterator[dict]:
    """The raw samples of one sub-stream for one epoch, before shuffling."""
    order = list(urls)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if len(order) >= n_sub:
        for url in order[sid::n_sub]:
            yield from iter_samples(url, counter)
    else:
        i = 0
        for url in order:
            for sample in iter_samples(url, counter):
                if i % n_sub == sid:
                    yield sample
                i += 1


class ShardStream(IterableDataset):
    """Endless shuffled samples of one modality for this rank; split across DataLoader workers.

    `decode(raw) -> dict | None` turns a raw sample into what the batcher needs (None = a bad
    sample, counted as `decode_failed` and passed on marked `__failed__`). Each yielded dict
    carries `__key__` and `__errors__` (this worker's cumulative failure counts, for logging).
    """

    def __init__(self, spec: str, rank: int, world: int, seed: int, shuffle_buffer: int,
                 decode: Callable[[dict], dict | None]):
        self.urls = list_shards(spec)
        self.spec, self.rank, self.world = spec, rank, world
        self.seed, self.shuffle_buffer, self.decode = seed, shuffle_buffer, decode
        self.skip_per_worker: list[int] = []

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        sid, n_sub = self.rank * n_workers + worker, self.world * n_workers
        skip = self.skip_per_worker[worker] if worker < len(self.skip_per_worker) else 0
        counter = ErrorCounter()
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}-{sid}-{epoch}")
            buffer: list[dict] = []
            produced = 0
            for raw in assigned_samples(self.urls, sid, n_sub, self.seed, epoch, counter):
                produced += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], raw = raw, buffer[j]
                if skip > 0:
                    skip -= 1
                else:
                    yield self._emit(raw, counter)
            rng.shuffle(buffer)
            for raw in buffer:
                if skip > 0:
                    skip -= 1
                else:
                    yield self._emit(raw, counter)
            if produced == 0:
                raise RuntimeError(f"no readable samples for rank {self.rank} worker {worker} in "
                                   f"'{self.spec}' (failures: {dict(counter.counts)})")
            epoch += 1

    def _emit(self, raw: dict, counter: ErrorCounter) -> dict:
        # Every raw sample yields exactly one item, a failed decode too (marked `__failed__`), so
        # a resumed worker skips raw samples without decoding them.
        out = self.decode(raw)
        if out is None:
            counter("decode_failed")
            out = {"__failed__": True}
        out["__key__"] = raw.get("__key__", "")
        out["__errors__"] = dict(counter.counts)
        return out


def text_decoder(tokenizer, max_tokens: int) -> Callable[[dict], dict | None]:
    """Raw text sample -> {'tokens', 'modality'}; documents are wrapped in bos/eos and capped."""
    def decode(raw: dict) -> dict | None:
        data = raw.get("txt")
        if data is None:
            return None
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError:
            return None
        if not text.strip():
            return None
        ids = [tokenizer.bos_id] + tokenizer.encode(text)[: max_tokens - 2] + [tokenizer.eos_id]
        return {"tokens": ids, "modality": 0}
    return decode


class Batches:
    """Training batches for one rank: samples -> packed rows -> (micro_batch, seq_len) tensors.

    `state_dict()` after any number of `next()` calls, loaded into a fresh `Batches` with the same
    config, makes it yield exactly the batches the original would have yielded next.
    """

    def __init__(self, stream: ShardStream, micro_batch: int, seq_len: int, pad_id: int,
                 num_workers: int):
        self.stream = stream
        self.micro_batch, self.num_workers = micro_batch, num_workers
        self.packer = Packer(seq_len, pad_id)
        self.consumed = 0                      # samples taken from the DataLoader so far
        self.errors: dict[int, dict] = {}      # worker -> its cumulative failure counts
        self.keys: list[str] = []              # keys started since the last `take_keys()`
        self._it = None

    def _iterator(self):
        W = max(self.num_workers, 1)
        # round-robin: worker w has yielded ceil((consumed - w) / W) of the consumed samples
        self.stream.skip_per_worker = [max(0, -(-(self.consumed - w) // W)) for w in range(W)]
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0,
                            prefetch_factor=4 if self.num_workers > 0 else None)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._iterator()
        while len(self.packer.ready) < self.micro_batch:
            sample = next(self._it)
            self.errors[self.consumed % max(self.num_workers, 1)] = sample["__errors__"]
            self.consumed += 1
            if sample.get("__failed__"):
                continue
            self.keys.append(sample["__key__"])
            self.packer.add(sample["tokens"], sample["modality"], sample.get("loss_mask"))
        rows = self.packer.ready[: self.micro_batch]
        del self.packer.ready[: self.micro_batch]
        return collate(rows)

    def failures(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.errors.values():
            total.update(counts)
        return dict(total)

    def take_keys(self) -> list[str]:
        keys, self.keys = self.keys, []
        return keys

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "packer": self.packer.state_dict(),
                "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(f"data.num_workers changed from {state['num_workers']} to "
                             f"{self.num_workers}: the sample order cannot be resumed exactly")
        self.consumed = state["consumed"]
        self.packer.load_state_dict(state["packer"])
        self._it = None


def build_batches(data_cfg, train_cfg, tokenizer, rank: int, world: int) -> Batches:
    if not data_cfg.text:
        raise ValueError("config key 'data.text' is empty: give a directory of text shards")
    stream = ShardStream(data_cfg.text, rank, world, train_cfg.seed, data_cfg.shuffle_buffer,
                         text_decoder(tokenizer, max_tokens=64 * train_cfg.seq_len))
    return Batches(stream, train_cfg.micro_batch, train_cfg.seq_len, tokenizer.pad_id,
                   data_cfg.num_workers)
