"""Input records of `fusion-data` builders: .jsonl, .txt, .csv and .parquet files, read in order.

    read_records(path, text_col, columns) -> Record(index, line, fields), ...

Every reader checks the columns a builder needs (a JSONL record on its own keys, a CSV file on its
header row, a parquet file on its schema) and stops at the first malformed record with one
`InputError` naming the file and line. A UTF-8 byte order mark opening the file (Excel's
"CSV UTF-8") is skipped; bytes that are not UTF-8 come through as lone surrogates, for the sample
makers to count as `bad_utf8` (README, "Preparing data").
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fusion.cli import CliError

INPUT_FORMATS = (".jsonl", ".txt", ".csv", ".parquet")


class InputError(CliError):
    """A malformed or unreadable input file, named with the line where it broke."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")


@dataclass
class Record:
    index: int  # position among the file's records, from 0: decides the default key and shard
    line: int  # 1-based line (parquet: row) where the record starts
    fields: dict  # column -> value; text never fails to decode here (see read_records)


def read_records(
    path: str | os.PathLike,
    text_col: str,
    columns: Sequence = (),
    one_of: Sequence[str] = (),
    text_or: str | None = None,
) -> Iterator[Record]:
    """Records of a .jsonl / .txt / .csv / .parquet file, in order.

    `text_col` and `columns` must exist in every record (a .txt line is `{text_col: line}`), and
    at least one of `one_of` (vqa: the image or the video column). An entry of `columns` may be a
    tuple of alternatives, any one of which will do; `text_or` is an alternative to the text
    column (vqa: a `turns` column instead of question, answer and choices). A JSONL record is checked on
    its own keys; a CSV file on its header row, a parquet file on its schema. A missing column, an
    invalid JSON line, a ragged CSV row or an unreadable file raises InputError naming the file
    and line. Bytes that are not UTF-8 do not: they come through as lone surrogates
    (`surrogateescape`), and the sample function counts them as `bad_utf8`. A UTF-8 byte order
    mark opening the file (Excel's "CSV UTF-8") is skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    required = [(text_col, text_or) if text_or else text_col, *[c for c in columns if c != text_col]]
    readers = {".jsonl": _read_jsonl, ".txt": _read_txt, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise InputError(
            path, None, f"unknown input format '{suffix or path.name}' (expected {', '.join(INPUT_FORMATS)})"
        )
    if suffix == ".txt" and (len(required) > 1 or one_of or text_or):
        extra = (
            [*map(_column_names, required[1:]), " or ".join(one_of)]
            if one_of
            else list(map(_column_names, required[1:]))
        )
        raise InputError(
            path,
            None,
            f"a .txt input has one column per line; "
            f"column(s) {', '.join(extra)} need .jsonl, .csv or .parquet",
        )
    try:
        yield from readers[suffix](path, required, tuple(one_of))
    except InputError:
        raise
    except OSError as exn:
        raise InputError(path, None, f"cannot read: {exn.strerror or exn}") from exn


def _column_names(col: str | tuple[str, ...]) -> str:
    """'a', or 'a' or 'b' for a tuple of alternatives."""
    return " or ".join(f"'{c}'" for c in (col if isinstance(col, tuple) else (col,)))


def _missing(path, line, fields: Iterable[str], required: Sequence, what: str, one_of: Sequence[str] = ()):
    have = list(fields)
    shown = ", ".join(map(str, have[:10])) + (", ..." if len(have) > 10 else "")
    for col in required:
        if not any(c in have for c in (col if isinstance(col, tuple) else (col,))):
            raise InputError(
                path, line, f"missing column {_column_names(col)} in {what} (has: {shown or 'none'})"
            )
    if one_of and not any(col in have for col in one_of):
        wanted = " or ".join(f"'{col}'" for col in one_of)
        raise InputError(path, line, f"missing column {wanted} in {what} (has: {shown or 'none'})")


def _read_jsonl(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = raw.decode("utf-8", "surrogateescape").strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except ValueError as exn:
                raise InputError(path, line_no, f"invalid JSON: {exn}") from None
            if not isinstance(obj, dict):
                raise InputError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            _missing(path, line_no, obj, required, "record", one_of)
            yield Record(index, line_no, obj)
            index += 1


def _read_txt(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            text = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            if not text.strip():
                continue
            yield Record(index, line_no, {required[0]: text})
            index += 1


def _read_csv(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # documents are longer than the 128 KiB default
    try:
        # utf-8-sig: a leading byte order mark is not part of the first column's name
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
                if header is None:
                    raise InputError(path, 1, "empty file: expected a header row")
                _missing(path, 1, header, required, "header", one_of)
                index, start = 0, reader.line_num + 1
                for row in reader:
                    if not row or all(not c.strip() for c in row):
                        start = reader.line_num + 1
                        continue
                    if len(row) != len(header):
                        raise InputError(path, start, f"{len(row)} fields, header has {len(header)}")
                    yield Record(index, start, dict(zip(header, row)))
                    index, start = index + 1, reader.line_num + 1
            except csv.Error as exn:
                raise InputError(path, reader.line_num, f"bad CSV: {exn}") from None
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(path: Path, required: Sequence[str], one_of: Sequence[str]) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            path,
            None,
            "reading .parquet needs pyarrow (pip install pyarrow), or convert the file to .jsonl or .csv",
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exn:  # pyarrow raises its own error types for a bad file
        raise InputError(path, None, f"not a readable parquet file: {exn}") from None
    _missing(path, None, pf.schema_arrow.names, required, "schema", one_of)
    index = 0
    for batch in pf.iter_batches():
        for row in batch.to_pylist():
            yield Record(index, index + 1, row)
            index += 1
