"""Modality-balanced, resumable loading: sample streams split by rank and worker, packed rows, a
deterministic plan that mixes modalities by tokens.

**Streams.** A *sub-stream* is one (rank, worker) pair: id `sid = rank * W + worker` out of `R * W`.
Each is an endless, deterministic sequence of samples:
- epoch e shuffles the shard list with seed (seed, e), identically on every sub-stream;
- with at least as many shards as sub-streams, sub-stream `sid` reads shards `order[sid::R*W]`;
  with fewer, every sub-stream reads every shard and keeps samples `i % (R*W) == sid`, so no
  rank or worker is ever starved (webdataset #188, #225) and none sees another's samples;
- a shuffle buffer seeded by (seed, sid, e) mixes samples across shards.

**Plan.** Each modality has its own stream and packer, and every packed row holds one modality.
The modality of the next row is the one furthest behind its target share of rows,
`argmax_m p_m * (rows + 1) - rows_m`, with `p_m ~ w_m * n_m^alpha` (n_m: samples in the dataset).
A row is `seq_len` tokens, so this balances tokens, not samples (a video costs far more tokens than
a caption). The plan depends on row counts only: every rank draws the same modalities at every step,
so no rank waits on a module another rank never used.

**Workers.** With `data.num_workers = 0` the stream runs in the main process, without a
DataLoader. With workers, each one sends its samples in chunks of `ModalityRows.CHUNK` (one
inter-process message per chunk rather than per sample: for small pictures the message costs more
than the decode, docs/benchmarks.md); the main process unpacks them in order.

**Resume.** The DataLoader hands out worker chunks round-robin, so the number of samples the main
process has consumed fixes how many each worker yielded, whose turn is next and how far into its
chunk. Resume replays each worker's stream and skips that many raw samples without decoding them;
the worker whose turn is next first sends the rest of its interrupted chunk. The packers' partial
rows and the plan's counts are saved too. The sequence after resume equals the uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fusion.data.sequence import Packer, collate
from fusion.data.shards import ErrorCounter, list_shards, read_shard_stats
from fusion.data.tar import iter_samples
from fusion.schema import MODALITIES


class NoDataError(RuntimeError):
    """A stream that cannot go on: no readable sample at all, or only unusable ones."""

    @staticmethod
    def one_line(exc: BaseException) -> str:
        """The one-line message, also when a DataLoader worker re-raised it inside a traceback."""
        lines = [l for l in str(exc).strip().splitlines() if l.strip()]
        last = lines[-1] if lines else type(exc).__name__
        return last.split("NoDataError: ", 1)[-1]


def assigned_samples(
    urls: list[str], sid: int, n_sub: int, seed: int, epoch: int, counter: ErrorCounter
) -> Iterator[dict]:
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
    sample, passed on marked `__failed__`; `decode.counter`, when it has one, is given this
    worker's ErrorCounter for its reasons). Each yielded dict carries `__key__` and `__errors__`
    (this worker's cumulative failure counts, for logging).
    """

    def __init__(
        self,
        spec: str,
        rank: int,
        world: int,
        seed: int,
        shuffle_buffer: int,
        decode: Callable[[dict], dict | None],
    ):
        self.urls = list_shards(spec)
        self.spec, self.rank, self.world = spec, rank, world
        self.seed, self.shuffle_buffer, self.decode = seed, shuffle_buffer, decode
        self.skip_per_worker: list[int] = []  # indexed by the worker's role (see __iter__)
        self.role_offset = 0
        self.chunk = 0  # 0: yield samples; n: yield lists of n samples (worker messages)
        self.first_chunk = 0  # size of loader worker 0's first chunk when resuming mid-chunk

    def __iter__(self):
        info = get_worker_info()
        loader_worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # A fresh DataLoader starts its round-robin at its worker 0; on resume that must be the
        # worker whose turn was next, so loader worker i plays role (i + role_offset) % W.
        worker = (loader_worker + self.role_offset) % n_workers
        samples = self._samples(worker, n_workers)
        if self.chunk == 0:
            yield from samples
            return
        size = (self.first_chunk or self.chunk) if loader_worker == 0 else self.chunk
        while True:
            yield list(itertools.islice(samples, size))  # the stream is endless: always full
            size = self.chunk

    def _samples(self, worker: int, n_workers: int):
        sid, n_sub = self.rank * n_workers + worker, self.world * n_workers
        skip = self.skip_per_worker[worker] if worker < len(self.skip_per_worker) else 0
        counter = ErrorCounter()
        if hasattr(self.decode, "counter"):
            self.decode.counter = counter
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
                if buffer:  # shuffle_buffer 0: samples in shard order (shards are still shuffled)
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
                raise NoDataError(
                    f"no readable samples for rank {self.rank} worker {worker} in "
                    f"'{self.spec}' (failures: {dict(counter.counts)})"
                )
            epoch += 1

    def _emit(self, raw: dict, counter: ErrorCounter) -> dict:
        # Every raw sample yields exactly one item, a failed decode too (marked `__failed__`), so
        # a resumed worker skips raw samples without decoding them.
        out = self.decode(raw)
        if out is None:
            if not hasattr(self.decode, "counter"):
                counter("decode_failed")
            out = {"__failed__": True}
        out["__key__"] = raw.get("__key__", "")
        out["__errors__"] = dict(counter.counts)
        return out


class ModalityRows:
    """One modality for one rank: a stream through a DataLoader into its own packer."""

    # a stream that yields nothing usable for this many samples in a row is broken, not unlucky
    MAX_FAILURES_IN_A_ROW = 10_000
    CHUNK = 8  # samples per message from a DataLoader worker

    def __init__(self, stream: ShardStream, seq_len: int, pad_id: int, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        self.packer = Packer(seq_len, pad_id)
        self.consumed = 0  # samples taken from the DataLoader so far
        self.errors: dict[int, dict] = {}  # worker -> its cumulative failure counts
        self.keys: list[str] = []  # keys started since the last `take_keys()`
        self._it = None

    def _role(self, n: int) -> int:
        """The worker role that produced sample number `n` (0 without workers)."""
        return (n // self.CHUNK) % self.num_workers if self.num_workers else 0

    def _iterator(self):
        stream = self.stream
        if self.num_workers == 0:  # the main process reads: no DataLoader in between
            stream.skip_per_worker, stream.role_offset = [self.consumed], 0
            stream.chunk, stream.first_chunk = 0, 0
            return iter(stream)
        W, k = self.num_workers, self.CHUNK
        # round-robin over chunks of k samples: `full` whole chunks and `off` samples of the next
        # one are consumed; the role in turn w has sent ceil((full - w) / W) of the whole chunks
        full, off = divmod(self.consumed, k)
        skip = [k * max(0, -(-(full - w) // W)) for w in range(W)]
        skip[full % W] += off
        stream.skip_per_worker, stream.role_offset = skip, full % W
        stream.chunk, stream.first_chunk = k, k - off
        loader = DataLoader(
            stream,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=W,
            persistent_workers=True,
            prefetch_factor=2,
        )
        return itertools.chain.from_iterable(loader)

    def next_row(self) -> dict:
        if self._it is None:
            self._it = self._iterator()
        failures = 0
        while not self.packer.ready:
            sample = next(self._it)
            self.errors[self._role(self.consumed)] = sample["__errors__"]
            self.consumed += 1
            if sample.get("__failed__"):
                failures += 1
            else:
                self.keys.append(sample["__key__"])
                dropped = self.packer.dropped
                self.packer.add(
                    sample["tokens"],
                    sample["modality"],
                    sample.get("loss_mask"),
                    images=sample.get("images", ()),
                    videos=sample.get("videos", ()),
                    min_pairs=sample.get("min_pairs", 0),
                )
                failures = failures + 1 if self.packer.dropped > dropped else 0
            if failures >= self.MAX_FAILURES_IN_A_ROW:
                raise NoDataError(
                    f"{failures} unusable samples in a row from '{self.stream.spec}' "
                    f"(failures: {self.failures()})"
                )
        return self.packer.ready.pop(0)

    def failures(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.errors.values():
            total.update(counts)
        if self.packer.dropped:
            total["too_long"] += self.packer.dropped
        return dict(total)

    def state_dict(self) -> dict:
        return {
            "consumed": self.consumed,
            "packer": self.packer.state_dict(),
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"data.num_workers changed from {state['num_workers']} to "
                f"{self.num_workers}: the sample order cannot be resumed exactly"
            )
        self.consumed = state["consumed"]
        self.packer.load_state_dict(state["packer"])
        self._it = None


def _as_is(chunk: list[dict]) -> list[dict]:
    """The DataLoader's default conversion walks every token list item by item (~40% of an image
    sample's loading time, tools/bench_data.py); samples are ready as they are."""
    return chunk


def plan_next(probs: dict[str, float], rows: dict[str, int]) -> str:
    """The modality furthest behind its target share of rows (ties: the first in MODALITIES)."""
    total = sum(rows.values()) + 1
    return max(probs, key=lambda m: (probs[m] * total - rows[m], -MODALITIES.index(m)))


def target_shares(
    specs: dict[str, str], weights: dict[str, float], alpha: float, sizes: dict[str, int] | None = None
) -> dict[str, float]:
    """p_m ~ w_m * n_m^alpha over the modalities in use (n_m: `sizes`, by default
    `dataset_sizes`; not read when alpha is 0)."""
    if not alpha:
        sizes = {m: 1 for m in specs}
    elif sizes is None:
        sizes = dataset_sizes(specs)[0]
    raw = {m: weights[m] * sizes[m] ** alpha for m in specs}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("config key 'data.weights': every modality in use has weight 0")
    return {m: v / total for m, v in raw.items() if v > 0}


def dataset_sizes(specs: dict[str, str]) -> tuple[dict[str, int], str]:
    """Size of each modality's data, and its unit: "samples" when every modality's count is known
    (from index.json, or the shards' *_stats.json, for a directory, a brace pattern or a list
    alike; shards without either are estimated from the others), else "shards" for all, so that
    data.alpha never compares samples with shards."""
    samples = {m: dataset_samples(spec) for m, spec in specs.items()}
    if all(n is not None for n in samples.values()):
        return samples, "samples"
    return {m: len(list_shards(spec)) for m, spec in specs.items()}, "shards"


def dataset_samples(spec: str) -> int | None:
    """Samples in the shards `spec` names, or None when no shard's count is recorded."""
    indexes: dict[Path, dict[str, int]] = {}
    counts = []
    for shard in list_shards(spec):
        path = Path(shard)
        if path.parent not in indexes:
            indexes[path.parent] = _index_counts(path.parent)
        n = indexes[path.parent].get(path.name)
        if n is None:
            stats = read_shard_stats(shard)
            n = stats.get("successes") if stats else None
        counts.append(n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None)
    known = [n for n in counts if n is not None]
    if not known:
        return None
    return round(sum(known) * len(counts) / len(known))  # unknown shards: the mean of the known


def _index_counts(directory: Path) -> dict[str, int]:
    try:
        index = json.loads((directory / "index.json").read_text())
        return {e["name"]: e["n_samples"] for e in index["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class Batches:
    """Training batches for one rank: (micro_batch, seq_len) tensors of rows planned by modality.

    `state_dict()` after any number of `next()` calls, loaded into a fresh `Batches` with the same
    config, makes it yield exactly the batches the original would have yielded next.
    """

    def __init__(self, sources: dict[str, ModalityRows], probs: dict[str, float], micro_batch: int):
        self.sources, self.probs, self.micro_batch = sources, probs, micro_batch
        self.rows = {m: 0 for m in probs}  # rows planned per modality
        self.tokens = {m: 0 for m in MODALITIES}  # non-padding tokens delivered per modality

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.micro_batch):
            m = plan_next(self.probs, self.rows)
            self.rows[m] += 1
            row = self.sources[m].next_row()
            self.tokens[m] += len(row["doc_ids"]) - row["doc_ids"].count(-1)  # padding is -1
            rows.append(row)
        return collate(rows)

    def shares(self) -> dict[str, float]:
        """Realised share of non-padding tokens per modality, beside the target in `probs`."""
        total = max(sum(self.tokens.values()), 1)
        return {m: self.tokens[m] / total for m in self.probs}

    def failures(self) -> dict[str, int]:
        total: Counter = Counter()
        for src in self.sources.values():
            total.update(src.failures())
        return dict(total)

    def take_keys(self) -> list[str]:
        keys = []
        for src in self.sources.values():
            keys += src.keys
            src.keys = []
        return keys

    def state_dict(self) -> dict:
        return {
            "rows": dict(self.rows),
            "tokens": dict(self.tokens),
            "sources": {m: src.state_dict() for m, src in self.sources.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["sources"]) != set(self.sources):
            raise ValueError(
                f"the checkpoint's modalities {sorted(state['sources'])} differ from this "
                f"run's {sorted(self.sources)} (data.text / data.image / data.video)"
            )
        self.rows = dict(state["rows"])
        self.tokens = dict(state["tokens"])
        for m, src in self.sources.items():
            src.load_state_dict(state["sources"][m])


def build_batches(cfg, tokenizer, rank: int, world: int, train: bool = True) -> Batches:
    """The modalities whose `data.*` is set and whose weight is positive, mixed per the config."""
    from fusion.data.samples import SampleMaker

    d, t = cfg.data, cfg.train
    specs = {m: getattr(d, m) for m in MODALITIES if getattr(d, m)}
    if not specs:
        raise ValueError(
            "config keys 'data.text', 'data.image', 'data.video' are all empty: "
            "give at least one shard directory"
        )
    weights = dict(zip(MODALITIES, d.weights))
    sizes, unit = dataset_sizes(specs) if d.alpha else (None, "samples")
    probs = target_shares(specs, weights, d.alpha, sizes)
    if unit == "shards" and rank == 0:
        print(
            "data.alpha: some modality's sample count is unknown (no index.json or shard stats, "
            "e.g. remote shards): sizes are counted in shards for every modality",
            flush=True,
        )
    sources = {}
    for m in probs:
        stream = ShardStream(
            specs[m],
            rank,
            world,
            t.seed + MODALITIES.index(m),
            d.shuffle_buffer,
            SampleMaker(cfg, tokenizer, train=train),
        )
        sources[m] = ModalityRows(stream, t.seq_len, tokenizer.pad_id, d.num_workers)
    return Batches(sources, probs, t.micro_batch)
