"""Loader throughput with 1% bad samples, as a ratio to the same loader on clean shards.

    python tools/bench_bad_data.py --n 3000 --bad 0.01 --out runs/bench_bad_data.json

Two image datasets of `--n` samples are written to --workdir: a clean one, and the same with a
fraction `--bad` of the samples replaced by hostile ones (cycling through: a 0-byte image, a PDF
named .jpg, a pixel-bomb PNG header, a truncated PNG, a non-UTF-8 caption, a 1 MB caption, a
symlink member). `build_batches` reads each (in-process, `data.num_workers=0`), alternating
`--repeats` times so both see the same background load; the best rate of each is kept. Rates are
samples taken from the stream per second (bad ones included) and usable samples per second.
The failures the loader counted are printed beside. Timing is never a test.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PER_SHARD = 500
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def picture(rng: random.Random, size: int = 32) -> bytes:
    arr = np.full((size, size, 3), rng.randrange(256), np.uint8)
    x, y = rng.randrange(size - 8), rng.randrange(size - 8)
    arr[y : y + 8, x : x + 8] = (rng.randrange(256), 40, 200)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb is refused from it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def bad_sample(i: int, good: bytes) -> list[tuple[str, bytes, bytes]]:
    """(extension, data, tar type) members of the i-th kind of bad sample."""
    kinds = [
        [("jpg", b""), ("txt", b"empty picture")],
        [("jpg", PDF), ("txt", b"a pdf")],
        [("png", png_header(30000, 30000)), ("txt", b"a bomb")],
        [("png", good[: len(good) // 2]), ("txt", b"cut in half")],
        [("png", good), ("txt", b"caf\xe9")],
        [("png", good), ("txt", b"a" * (1 << 20))],
        [("png", None), ("txt", b"a symlinked picture")],
    ]
    return kinds[i % len(kinds)]


def write_dataset(out: Path, n: int, bad: float, seed: int) -> int:
    rng = random.Random(seed)
    out.mkdir(parents=True)
    every = round(1 / bad) if bad else 0
    n_bad = 0
    for s in range(0, n, PER_SHARD):
        with tarfile.open(out / f"{s // PER_SHARD:06d}.tar", "w") as tar:
            for i in range(s, min(n, s + PER_SHARD)):
                good = picture(rng)
                members = [("png", good), ("txt", f"picture {i}".encode())]
                if every and i % every == every // 2:
                    members = bad_sample(n_bad, good)
                    n_bad += 1
                for ext, data in members:
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    if data is None:
                        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                        tar.addfile(info)
                    else:
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return n_bad


def rate(spec: str, n: int) -> tuple[float, float, dict]:
    """(samples/s taken from the stream, usable samples/s, failures) over `n` samples."""
    from fusion.config import load_config
    from fusion.data.mixing import build_batches
    from fusion.data.tokenizer import build_tokenizer

    cfg = load_config(
        None,
        [
            f"data.image={spec}",
            "data.num_workers=0",
            "data.shuffle_buffer=64",
            "train.micro_batch=8",
            "train.seq_len=128",
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
        ],
    )
    batches = build_batches(cfg, build_tokenizer("byte"), 0, 1)
    rows = batches.sources["image"]
    next(batches)  # warm-up: imports, first shard opened
    start_consumed, start_keys = rows.consumed, len(rows.keys)
    t0 = time.perf_counter()
    while rows.consumed - start_consumed < n:
        next(batches)
    seconds = time.perf_counter() - t0
    taken, usable = rows.consumed - start_consumed, len(rows.keys) - start_keys
    return taken / seconds, usable / seconds, batches.failures()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="samples per dataset (default 3000)")
    p.add_argument("--bad", type=float, default=0.01, help="fraction of bad samples (default 0.01)")
    p.add_argument("--repeats", type=int, default=3, help="alternating measurements of each")
    p.add_argument("--workdir", default="runs/bench_bad_data", help="where the datasets are written")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not 0 <= args.bad < 1 or args.n < PER_SHARD:
        p.error(f"--bad must be in [0, 1) and --n at least {PER_SHARD}")

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    write_dataset(work / "clean", args.n, 0.0, seed=0)
    n_bad = write_dataset(work / "bad", args.n, args.bad, seed=0)
    n = args.n - 2 * 64  # stay inside the first epoch after the warm-up and the shuffle buffer
    best = {"clean": (0.0, 0.0, {}), "bad": (0.0, 0.0, {})}
    for _ in range(args.repeats):
        for name in ("clean", "bad"):
            r = rate(str(work / name), n)
            if r[0] > best[name][0]:
                best[name] = r
    result = {
        "samples": args.n,
        "bad_samples": n_bad,
        "clean_samples_per_s": round(best["clean"][0], 1),
        "bad_samples_per_s": round(best["bad"][0], 1),
        "ratio_taken": round(best["bad"][0] / best["clean"][0], 3),
        "ratio_usable": round(best["bad"][1] / best["clean"][1], 3),
        "failures_counted": best["bad"][2],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
