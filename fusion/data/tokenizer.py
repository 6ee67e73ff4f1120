"""Tokenizers: the byte-level one and Hugging Face tokenizer.json files, with fusion's special
tokens (fusion/schema.py) bound to ids.

Two tokenizers share one interface (`encode`, `decode`, `vocab_size`, special-token ids):
- `ByteTokenizer`: UTF-8 bytes are ids 0..255, the special tokens follow. Needs no file.
- `HFTokenizer`: a local Hugging Face `tokenizer.json` (the `tokenizers` package); special tokens
  it lacks are appended after its vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from fusion.schema import SPECIAL_TOKENS


class _Specials:
    """Attribute access to special-token ids: tok.pad_id, tok.bos_id, ..."""

    def _bind_specials(self, ids: dict[str, int]) -> None:
        self.special_ids = dict(ids)
        self.pad_id = ids["<|pad|>"]
        self.bos_id = ids["<|begin_of_text|>"]
        self.eos_id = ids["<|end_of_text|>"]
        self.image_start_id = ids["<|image_start|>"]
        self.image_end_id = ids["<|image_end|>"]
        self.patch_id = ids["<|patch|>"]
        self.video_start_id = ids["<|video_start|>"]
        self.video_end_id = ids["<|video_end|>"]
        self.frame_sep_id = ids["<|frame_sep|>"]


class ByteTokenizer(_Specials):
    name = "byte"

    def __init__(self) -> None:
        self._bind_specials({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(_Specials):
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer: tokenizer file not found: {path}")
        self.name = str(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise ValueError(
                f"data.tokenizer: {path} is not a tokenizer.json the tokenizers "
                f"library can read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            self._tok.add_special_tokens(missing)
        self._bind_specials({t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS})
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`byte`, or the path of a local tokenizer.json."""
    if spec in ("", "byte"):
        return ByteTokenizer()
    return HFTokenizer(spec)
