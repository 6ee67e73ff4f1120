"""`fusion-data tokenizer`: train a Hugging Face tokenizer.json on the text of shard directories.

    fusion-data tokenizer --input shards/image shards/vqa --output shards/tokenizer.json
    fusion-data tokenizer --input shards/text --output tok.json --kind bpe --vocab-size 16000
    fusion-data tokenizer --input shards/image shards/vqa --output tok.json --kind word

The text is what training tokenizes (`fusion.data.samples`), read from the shards as bytes
(`fusion.data.shards.iter_samples`): a text shard's `.txt`; an image or video caption shard's
`.txt`, with the space training puts between media and caption; a VQA shard's `.json` question in
the training prompt (`vqa_prompt`), its answer and every choice (`vqa_answer`), for each of its
`turns` when it has several questions. Other `.json` fields (video sizes, sources) are not text.

Two kinds:
- `bpe` (default): byte-level BPE (GPT-2's byte alphabet and pre-tokenizer, Hugging Face
  `tokenizers` BpeTrainer): any text encodes, nothing is unknown. The vocabulary holds the 256
  bytes, fusion's special tokens (ids 0-8) and merges up to `--vocab-size`; a small corpus may
  stop short of it.
- `word`: one token per word or punctuation run (`WORD_PATTERN`, what the `tokenizers` Whitespace
  pre-tokenizer splits), anything unseen is `<|unk|>` (id 0), and fusion's special tokens follow
  the words. For small closed worlds (the toy world's tokenizer is built by the same function,
  `word_level_tokenizer`): a question is a few tokens and an answer one. `--vocab-size` keeps the
  most frequent words.

Either way the file stores every special token of `fusion.schema.SPECIAL_TOKENS`, so their
ids are fixed in it, and it loads with `build_tokenizer(path)` (`data.tokenizer: PATH` in a
config). The same input gives a byte-identical file: shards are read in a fixed order, word
counts are ranked with ties broken by the word, and the trainer's merges do not depend on thread
scheduling. The file is written to a temporary name, loaded back as a check, and renamed over
`--output`: an existing file is replaced whole or not at all.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from fusion.cli import CliError, int_at_least
from fusion.data.shards import IMAGE_EXTS, VIDEO_EXTS, ErrorCounter, SampleError, shards_in_dir
from fusion.data.tar import decode_json, decode_text, iter_samples
from fusion.data.tokenizer import HFTokenizer
from fusion.schema import SPECIAL_TOKENS

KINDS = ("bpe", "word")
# A word or a run of punctuation: the regex of the `tokenizers` Whitespace pre-tokenizer
# (`\w+|[^\w\s]+`), so "triangle?" is two words.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")
UNKNOWN_WORD = "<|unk|>"
DEFAULT_BPE_VOCAB = 8192
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
MAX_VOCAB = 1 << 20


# ---------------------------------------------------------------- building tokenizers


def prompt_words() -> tuple[str, ...]:
    """Words every word-level tokenizer holds: the VQA prompt's own ("Q", ":", "A"), so any set
    of questions scores in the training format even when the input had none. (Imported here, not
    at the top: fusion.data.samples brings torch, and building the fusion-data parser must not.)"""
    from fusion.data.samples import vqa_prompt

    return tuple(dict.fromkeys(WORD_PATTERN.findall(vqa_prompt(""))))


def min_vocab(kind: str) -> int:
    """The smallest --vocab-size of `kind`: bpe the bytes and the special tokens; word
    <|unk|>, the prompt words and the special tokens."""
    return MIN_BPE_VOCAB if kind == "bpe" else 1 + len(prompt_words()) + len(SPECIAL_TOKENS)


def word_level_tokenizer(words: Iterable[str]):
    """A word-level `tokenizers.Tokenizer` over `words`: `<|unk|>` id 0, the words in sorted
    order, then fusion's special tokens; Whitespace pre-tokenizer. Same words, same tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {UNKNOWN_WORD: 0}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN_WORD))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (GPT-2's byte alphabet and
    pre-tokenizer, no prefix space: training puts its own spaces), fusion's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, path: str | os.PathLike, check: bool = False) -> None:
    """Write `tok` as a tokenizer.json: into a temporary file beside `path` (fsynced), loaded back
    with `HFTokenizer` when `check`, then renamed over `path`. An existing file is replaced whole
    or, on any error, left as it was (the temporary file is removed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tok.to_str(pretty=True).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        if check:
            HFTokenizer(tmp)  # what training and fusion-eval will do with it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- reading text from shards


def sample_texts(sample: dict) -> list[str]:
    """The texts of one raw shard sample, as training tokenizes them (see the module docstring).
    Raises SampleError (bad_utf8, bad_json) for a member that cannot be read."""
    from fusion.data.samples import vqa_answer, vqa_prompt

    texts = []
    media = any(e in sample for e in (*IMAGE_EXTS, *VIDEO_EXTS))
    if "txt" in sample:
        text = decode_text(sample["txt"]).strip()
        if text:
            texts.append(" " + text if media else text)
    if media and "json" in sample:
        meta = decode_json(sample["json"])
        # a record of several questions lists them in `turns` (the top-level question, when
        # there too, repeats the first)
        turns = meta.get("turns") if isinstance(meta, dict) else None
        for turn in turns if isinstance(turns, list) else [meta]:
            if not isinstance(turn, dict) or not isinstance(turn.get("question"), str):
                continue
            texts.append(vqa_prompt(turn["question"]))
            choices = turn.get("choices")
            answers = [turn.get("answer"), *(choices if isinstance(choices, list) else [])]
            answers = [str(a).strip() for a in answers if isinstance(a, (str, int, float))]
            texts += [vqa_answer(a) for a in dict.fromkeys(answers) if a]
    return texts


class TextReader:
    """Iterates over the texts of shard directories in a fixed order (directories as given,
    shards natural-sorted, samples as stored), counting what it read and skipped."""

    def __init__(self, dirs: list[Path]):
        self.shards = [s for d in dirs for s in shards_in_dir(d)]
        self.counter = ErrorCounter()
        self.samples = self.with_text = self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for sample in iter_samples(self.shards, self.counter):
            self.samples += 1
            try:
                texts = sample_texts(sample)
            except SampleError as exn:
                self.counter(exn, f"{sample['__url__']} {sample['__key__']}")
                continue
            if not texts:
                self.counter("no_text")
                continue
            self.with_text += 1
            for text in texts:
                self.chars += len(text)
                yield text


def check_inputs(inputs: list[str]) -> list[Path]:
    """The --input directories, each holding .tar shards; CliError naming the first that does not."""
    dirs = []
    for name in inputs:
        path = Path(name)
        if not path.exists():
            raise CliError(f"--input: no such directory: '{path}'")
        if not path.is_dir():
            raise CliError(
                f"--input: '{path}' is not a directory (give shard directories, "
                f"e.g. what `fusion-data images --output` wrote)"
            )
        if not shards_in_dir(path):
            raise CliError(f"--input: no .tar shards in '{path}'")
        dirs.append(path)
    return dirs


def check_vocab_size(kind: str, vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    low = min_vocab(kind)
    if vocab_size < low:
        what = (
            "the 256 bytes and"
            if kind == "bpe"
            else f"{UNKNOWN_WORD}, the VQA prompt's {len(prompt_words())} words and"
        )
        raise CliError(
            f"--vocab-size: {vocab_size} is too small for --kind {kind}: at least "
            f"{low} ({what} {len(SPECIAL_TOKENS)} special tokens)"
        )
    if vocab_size > MAX_VOCAB:
        raise CliError(f"--vocab-size: {vocab_size} is larger than {MAX_VOCAB:,}")


def check_output(output: str) -> Path:
    path = Path(output)
    if path.is_dir():
        raise CliError(
            f"--output: '{path}' is a directory; give the file to write, e.g. '{path / 'tokenizer.json'}'"
        )
    return path


# ---------------------------------------------------------------- training


def train_tokenizer(inputs: list[str], output: str, kind: str = "bpe", vocab_size: int | None = None) -> dict:
    """Train a `kind` tokenizer on the text of the shard directories `inputs`, write it to
    `output`; return a summary {output, kind, vocab_size, samples, with_text, chars, skipped,
    words, words_kept}. CliError (one line naming the flag or file) on bad input."""
    if kind not in KINDS:
        raise CliError(f"--kind: '{kind}' is not one of {', '.join(KINDS)}")
    check_vocab_size(kind, vocab_size)
    path = check_output(output)
    dirs = check_inputs(inputs)
    reader = TextReader(dirs)
    words_total = words_kept = None
    if kind == "word":
        counts = Counter(w for text in reader for w in WORD_PATTERN.findall(text))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        room = float("inf") if vocab_size is None else vocab_size - 1 - len(SPECIAL_TOKENS)
        words = set(prompt_words())
        for w in ranked:
            if len(words) >= room and w not in words:
                break
            words.add(w)
        words_total, words_kept = len(counts), len(words & counts.keys())
        tok = word_level_tokenizer(words) if counts else None
    else:
        tok = bpe_tokenizer(reader, vocab_size or DEFAULT_BPE_VOCAB)
    if reader.chars == 0 or tok is None:
        names = ", ".join(f"'{d}'" for d in dirs)
        skipped = f"; skipped: {reader.counter.summary()}" if reader.counter.total else ""
        raise CliError(
            f"--input: no text in the {reader.samples:,} samples of {names} (text "
            f"shards: .txt; caption shards: .txt; VQA shards: the .json's question, "
            f"answer and choices){skipped}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tok, path, check=True)
    except OSError as exn:
        raise CliError(f"--output: cannot write '{path}': {exn.strerror or exn}") from None
    loaded = HFTokenizer(path)
    return {
        "output": str(path),
        "kind": kind,
        "vocab_size": loaded.vocab_size,
        "samples": reader.samples,
        "with_text": reader.with_text,
        "chars": reader.chars,
        "skipped": dict(reader.counter.counts),
        "words": words_total,
        "words_kept": words_kept,
        "inputs": [str(d) for d in dirs],
    }


def format_summary(s: dict) -> str:
    line = (
        f"tokenizer: {s['kind']}, vocabulary {s['vocab_size']:,} ({len(SPECIAL_TOKENS)} special "
        f"tokens) from {s['chars']:,} characters of {s['with_text']:,} samples in "
        f"{', '.join(s['inputs'])} -> {s['output']}"
    )
    if s["words"] is not None and s["words_kept"] < s["words"]:
        line += f"; {s['words_kept']:,} of {s['words']:,} words kept (the rarer ones become {UNKNOWN_WORD})"
    skipped = sum(s["skipped"].values())
    if skipped:
        line += "; skipped: " + ", ".join(
            f"{r}: {n:,}" for r, n in sorted(s["skipped"].items(), key=lambda x: (-x[1], x[0]))
        )
    return line


# ---------------------------------------------------------------- command line


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fusion-data tokenizer`."""
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="DIR",
        help="shard directories to read the text of: text shards (.txt), image or "
        "video caption shards (.txt), VQA shards (the .json's question, answer "
        "and choices); read in the order given",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="the tokenizer.json to write (parent directories are created; an "
        "existing file is replaced atomically); use it as data.tokenizer",
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="bpe",
        help="bpe: byte-level BPE, any text encodes (default); word: one token per "
        f"word or punctuation run, unseen words become {UNKNOWN_WORD} (for small "
        "closed vocabularies such as the toy world's)",
    )
    p.add_argument(
        "--vocab-size",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=f"vocabulary size including the {len(SPECIAL_TOKENS)} special tokens; bpe: "
        f"at least {MIN_BPE_VOCAB} (default {DEFAULT_BPE_VOCAB}; a small corpus "
        f"may give fewer); word: keep the most frequent words (default: every "
        f"word)",
    )


def run_tokenizer(args: argparse.Namespace) -> int:
    """`fusion-data tokenizer`: train, write, print one summary line."""
    summary = train_tokenizer(args.input, args.output, kind=args.kind, vocab_size=args.vocab_size)
    print(format_summary(summary))
    return 0
