"""Safetensors files of a conversion: reading a directory's tensors lazily (`SafeTensorsDir`, one
file or the shards of an index; pickled weights are never read) and writing a file one tensor at
a time (`Entry`, `write_safetensors`), so memory stays near one tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fusion.convert.errors import ConvertError

INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafeTensorsDir:
    """Name -> tensor over a directory's safetensors (single file or sharded index), read lazily."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.dir = directory
        if (directory / INDEX).is_file():
            try:
                weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(
                    f"{directory / INDEX}: not a safetensors index with a weight_map ({e})"
                ) from None
            files = sorted(set(weight_map.values()))
        elif (directory / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            pickled = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
            hint = (
                (
                    f" (found {', '.join(sorted(pickled)[:3])}: pickled weights are not read; save the "
                    "model with safetensors first)"
                )
                if pickled
                else ""
            )
            raise ConvertError(f"{directory}: no {WEIGHTS} or {INDEX}{hint}")
        self._handles = {}
        self.where: dict[str, str] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConvertError(f"{directory / INDEX} lists {name}, which does not exist")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:
                raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.where[key] = name

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ConvertError(f"{self.dir}: tensor '{key}' is missing from the checkpoint")
        return self._handles[self.where[key]].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self._slice(key).get_dtype()
        for dt, c in _ST_DTYPES.items():
            if c == code:
                return dt
        raise ConvertError(f"{self.dir}: tensor '{key}' has unsupported dtype {code}")

    def _slice(self, key: str):
        if key not in self.where:
            raise ConvertError(f"{self.dir}: tensor '{key}' is missing from the checkpoint")
        return self._handles[self.where[key]].get_slice(key)


@dataclass
class Entry:
    """One output tensor: its shape and dtype up front (for the header), its data on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def write_safetensors(path: Path, entries: list[Entry]) -> None:
    """The safetensors layout (8-byte little-endian header length, JSON header, raw little-endian
    data in header order), written tensor by tensor to `path` via a temporary file."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        n = e.dtype.itemsize
        for d in e.shape:
            n *= d
        header[e.name] = {
            "dtype": _ST_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for e in entries:
            t = e.make()
            if tuple(t.shape) != e.shape:
                raise ConvertError(f"tensor '{e.name}' has shape {tuple(t.shape)}, expected {e.shape}")
            t = t.to(e.dtype).contiguous().cpu()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
