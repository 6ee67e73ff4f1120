"""Data-pipeline throughput as ratios to plain loops doing the same work, measured in one run.

    python tools/bench_data.py --inputs toy      # 64 px toy pictures: the worst case
    python tools/bench_data.py --inputs photo    # photo-like JPEGs and textured clips

Inputs are built first and kept in --workdir (reused when the settings match):
- `toy` (default): the toy image and video shards of `fusion-data toy` at --image-size (64 px:
  flat shapes, a few hundred bytes of PNG, 0.4 ms of decoding each), the pictures also written
  out as PNG files listed in a jsonl;
- `photo`: what users bring: JPEG (q90) pictures whose shorter side is --image-size (384) and
  longer side 4/3 of it, landscape and portrait alternating, with texture and sensor-like noise
  so they do not compress to nothing (~55 KB at 512x384); H.264 clips (crf 23, a keyframe every
  8 frames, as `fusion-data videos` stores them) of 48 frames at 24 fps whose shorter side is
  --video-size (256), a textured scene panning under noise. Both go into shards written by
  `ShardWriter` in the layout `fusion-data images|videos` writes, the pictures also as files
  listed in a jsonl.

Then, on the same samples and on the same CPUs:

| what    | subject                                      | reference (a plain loop)                        | target |
|---------|----------------------------------------------|-------------------------------------------------|--------|
| images  | `build_batches` over the image shards        | tar members read, Pillow decode + resize + crop | >= 0.8 |
| videos  | `build_batches` over the video shards        | tar members read, decord (1 thread) get_batch of the same frame indices + resize + crop | >= 0.7 |
| builder | `fusion-data images` on the jsonl of files   | file read, Pillow decode + resize + JPEG encode | >= 0.8 |

Same process count: with `--processes P` the whole benchmark is pinned to P CPUs
(`sched_setaffinity`) and each side runs P processes. The loader's main process counts as one of
them (it packs rows and collates; workers read, decode and tokenise), so `data.num_workers = P - 1`,
and 0 (everything in the main process) for P = 1; `--loader-workers N` measures another count on
the same P CPUs (e.g. P workers, the main process then mostly waiting). The builder gets
`--workers P` (in-process for P = 1; its process pool starts inside the timed run, as it does for
a user). References with P > 1 split the shards (files) round-robin over P processes started
before timing. Videos use `data.frame_strategy=segment_middle` so that the reference can decode
the very same frames.

Each measurement is warmed up, then the subject and its reference alternate `--repeats` times (so
both see the same background load); the best rate of each is kept and the ratio is subject / reference.
The CPU time of each run is recorded too, summed over the process tree (this process with its
threads, DataLoader workers, pools; from /proc): `cpu ratio` compares samples per CPU-second, the
work each side spends on a sample. It hardly moves with other programs sharing the CPUs; with one
process it approximates the ratio on an idle machine, with more it leaves out waiting (an idle
main process, an idle worker) and is not a throughput.
The loader is timed on windows of `--n-images` (`--n-videos`) samples taken from one persistent
iterator, counted where the packer takes them from the stream. Timing is never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

TARGETS = {"images": 0.8, "videos": 0.7, "builder": 0.8}
SAMPLES_PER_SHARD = 50  # toy shards: enough shards to split over workers without overlap
JPEG_QUALITY = 90
N_FRAMES = 8  # frames per video for the loader and the reference (data.n_frames)
PHOTO_FRAMES, PHOTO_FPS = 48, 24  # photo-like clips: 2 s
DEFAULTS = {  # per --inputs: image side, video side, images, videos, loader/builder crop
    "toy": {"image_size": 64, "video_size": None, "n_images": 2000, "n_videos": 200, "crop": None},
    "photo": {"image_size": 384, "video_size": 256, "n_images": 500, "n_videos": 100, "crop": 224},
}


def patch_size(crop: int) -> int:
    """model.vision.patch_size: 8 for toy crops (as configs/demo.yaml), 16 from 128 px up (a ViT-B/16)."""
    return 16 if crop >= 128 and crop % 16 == 0 else 8


# ---------------------------------------------------------------- the references (plain loops)


def crop_square(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), centre crop: the work `square_pixels` does."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((x0, y0, x0 + size, y0 + size)), dtype=np.uint8)  # (S, S, 3)


def tar_samples(path: str):
    """{ext: bytes} per key, every member read, in file order (plain `tarfile`)."""
    current, key = {}, None
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            k, _, ext = name.partition(".")
            if k != key and current:
                yield current
                current = {}
            key = k
            current[ext.lower()] = tar.extractfile(member).read()
    if current:
        yield current


def raw_images(shards: list[str], size: int) -> int:
    n = 0
    for path in shards:
        for sample in tar_samples(path):
            data = next(sample[e] for e in ("png", "jpg", "jpeg", "webp") if e in sample)
            img = Image.open(io.BytesIO(data)).convert("RGB")
            crop_square(img, size)
            n += 1
    return n


def raw_videos(shards: list[str], size: int, n_frames: int) -> int:
    import decord

    from fusion.data.sampling import FrameSampling, VideoMeta, sample_frame_indices

    sampling = FrameSampling(
        strategy="segment_middle",
        n_frames=n_frames,
        pad="repeat_last",
        min_frames=n_frames,
        max_frames=n_frames,
    )
    n = 0
    for path in shards:
        for sample in tar_samples(path):
            meta = VideoMeta.from_json(json.loads(sample["json"]))
            indices = sample_frame_indices(meta, sampling)
            reader = decord.VideoReader(io.BytesIO(sample["mp4"]), ctx=decord.cpu(0), num_threads=1)
            frames = reader.get_batch(indices).asnumpy()  # (F, H, W, 3)
            for frame in frames:
                crop_square(Image.fromarray(frame), size)
            n += 1
    return n


def raw_builds(files: list[str], size: int) -> int:
    for path in files:
        img = Image.open(io.BytesIO(Path(path).read_bytes()))
        img.load()
        img = ImageOps.fit(img.convert("RGB"), (size, size), method=Image.Resampling.LANCZOS)
        img.save(io.BytesIO(), "JPEG", quality=JPEG_QUALITY)
    return len(files)


class Reference:
    """A plain loop over `items`, split round-robin over P processes started once."""

    def __init__(self, fn, items: list[str], processes: int, pool, **kwargs):
        self.fn, self.kwargs, self.pool = fn, kwargs, pool
        self.chunks = [items[i::processes] for i in range(processes)]

    def __call__(self) -> tuple[int, float]:
        t0 = time.perf_counter()
        if self.pool is None:
            n = self.fn(self.chunks[0], **self.kwargs)
        else:
            results = [self.pool.apply_async(self.fn, (c,), self.kwargs) for c in self.chunks]
            n = sum(r.get() for r in results)
        return n, time.perf_counter() - t0


# ---------------------------------------------------------------- the subjects


class Loader:
    """Windows of `n` samples from one persistent `build_batches` iterator over one modality."""

    def __init__(self, modality: str, spec: str, n: int, num_workers: int, img_size: int):
        from fusion.config import load_config
        from fusion.data.mixing import build_batches
        from fusion.data.tokenizer import ByteTokenizer
        from fusion.schema import tokens_per_video

        self.num_workers = num_workers
        patch = patch_size(img_size)
        overrides = [
            f"data.{modality}={spec}",
            f"data.num_workers={self.num_workers}",
            f"model.vision.img_size={img_size}",
            f"model.vision.patch_size={patch}",
            f"data.n_frames={N_FRAMES}",
            "data.frame_strategy=segment_middle",
            "train.micro_batch=8",
        ]
        probe = load_config(
            None, [f"model.vision.img_size={img_size}", f"model.vision.patch_size={patch}"]
        ).model.vision
        # as configs/demo.yaml (256 at 32 px): a row holds one video and the start of its caption
        seq_len = -(-(tokens_per_video(probe, N_FRAMES) + 64) // 256) * 256
        self.cfg = load_config(None, overrides + [f"train.seq_len={seq_len}"])
        self.modality, self.n = modality, n
        self.batches = build_batches(self.cfg, ByteTokenizer(), rank=0, world=1)

    def take(self, n: int) -> tuple[int, float]:
        src = self.batches.sources[self.modality]
        start, t0 = src.consumed, time.perf_counter()
        while src.consumed - start < n:
            next(self.batches)
        return src.consumed - start, time.perf_counter() - t0

    def __call__(self) -> tuple[int, float]:
        return self.take(self.n)

    def describe(self) -> str:
        d = self.cfg.data
        return (
            f"build_batches, {self.modality} only, num_workers={self.num_workers}, "
            f"seq_len={self.cfg.train.seq_len}, micro_batch={self.cfg.train.micro_batch}, "
            f"img_size={self.cfg.model.vision.img_size}, "
            f"patch_size={self.cfg.model.vision.patch_size}"
            + (
                f", {d.n_frames} frames {d.frame_strategy}, backend {d.video_backend}"
                if self.modality == "video"
                else ""
            )
        )

    def close(self) -> dict:
        failures = self.batches.failures()
        self.batches = None  # drops the DataLoader iterators: workers exit
        return failures


class Builder:
    """`fusion-data images` into a fresh directory each time (a complete shard would be reused)."""

    def __init__(self, jsonl: Path, out_root: Path, n: int, processes: int, size: int):
        self.jsonl, self.out_root, self.n = jsonl, out_root, n
        self.spp = max(1, -(-n // (4 * processes)))  # 4 shards per worker: balanced
        self.flags = [
            "--workers",
            str(processes),
            "--samples-per-shard",
            str(self.spp),
            "--max-side",
            str(size),
            "--resize-mode",
            "center_crop",
            "--format",
            "jpg",
            "--quality",
            str(JPEG_QUALITY),
            "--no-progress",
        ]
        self.runs = 0

    def __call__(self) -> tuple[int, float]:
        from fusion.data.build import main as fusion_data

        out = self.out_root / f"run{self.runs}"
        self.runs += 1
        shutil.rmtree(out, ignore_errors=True)
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            rc = fusion_data(["images", "--input", str(self.jsonl), "--output", str(out), *self.flags])
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"fusion-data images exited {rc}: {log.getvalue()}")
        n = json.loads((out / "index.json").read_text())["n_samples"]
        shutil.rmtree(out, ignore_errors=True)
        if n != self.n:
            raise RuntimeError(f"fusion-data images wrote {n} of {self.n} samples: {log.getvalue()}")
        return n, seconds

    def describe(self) -> str:
        return "fusion-data images " + " ".join(self.flags)


# ---------------------------------------------------------------- inputs


def make_inputs(
    workdir: Path, kind: str, n_images: int, n_videos: int, image_size: int, video_size: int
) -> dict:
    """Shards and image files of one input kind, kept in WORKDIR/KIND-IMAGE[-VIDEO] and reused
    when its `inputs.json` records the same settings."""
    root = workdir / (f"toy-{image_size}" if kind == "toy" else f"photo-{image_size}-{video_size}")
    want = {
        "kind": kind,
        "image_size": image_size,
        "video_size": video_size,
        "n_images": n_images,
        "n_videos": n_videos,
        "samples_per_shard": SAMPLES_PER_SHARD,
    }
    manifest = root / "inputs.json"
    t0 = time.perf_counter()
    reused = manifest.is_file() and json.loads(manifest.read_text()) == want
    if not reused:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if kind == "toy":
            _toy_inputs(root, n_images, n_videos, image_size)
        else:
            _photo_inputs(root, n_images, n_videos, image_size, video_size)
        manifest.write_text(json.dumps(want) + "\n")
    jsonl = root / "images.jsonl"
    image_files = [str(root / json.loads(line)["image"]) for line in jsonl.read_text().splitlines()]
    return {
        "root": root,
        "image_shards": sorted(str(p) for p in (root / "image").glob("*.tar")),
        "video_shards": sorted(str(p) for p in (root / "video").glob("*.tar")),
        "jsonl": jsonl,
        "image_files": image_files,
        "image_bytes": sum(os.path.getsize(f) for f in image_files) // max(1, len(image_files)),
        "seconds": round(time.perf_counter() - t0, 1),
        "reused": reused,
    }


def _toy_inputs(root: Path, n_images: int, n_videos: int, image_size: int) -> None:
    from fusion.data.build import main as fusion_data

    zero = [
        f"--{k}"
        for k in (
            "n-text",
            "n-vqa-train",
            "n-vqa-test",
            "n-vqa-compositional",
            "n-video-vqa-train",
            "n-video-vqa-test",
        )
    ]
    argv = [
        "toy",
        "--output",
        str(root),
        "--image-size",
        str(image_size),
        "--n-image",
        str(n_images),
        "--n-video",
        str(n_videos),
        "--samples-per-shard",
        str(SAMPLES_PER_SHARD),
        "--workers",
        str(os.cpu_count() or 1),
    ]
    for flag in zero:
        argv += [flag, "0"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        rc = fusion_data(argv)
    if rc != 0:
        raise RuntimeError(f"fusion-data toy exited {rc}: {log.getvalue()}")
    files, lines = root / "files", []
    files.mkdir()
    for shard in sorted((root / "image").glob("*.tar")):
        for sample in tar_samples(str(shard)):
            key = f"{len(lines):06d}"
            (files / f"{key}.png").write_bytes(sample["png"])
            lines.append(json.dumps({"image": f"files/{key}.png", "caption": sample["txt"].decode()}))
    (root / "images.jsonl").write_text("\n".join(lines) + "\n")


WORDS = (
    "a red car parked by the old stone wall near a tree in the evening light two people "
    "walking their dog along the beach at sunset with waves and clouds over the hills"
).split()


def _caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(8, 25))))


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float (H, W, 3) in 0..255: smooth colour regions, edges and fine texture, like a photograph."""
    out = np.zeros((height, width, 3))
    for cells, amp in ((3, 90.0), (12, 45.0), (48, 25.0)):  # large shapes down to fine texture
        coarse = rng.uniform(-1, 1, (cells, cells * 4 // 3 + 1, 3)).astype(np.float32)
        img = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        out += (np.asarray(img, dtype=np.float32) / 127.5 - 1) * amp
    return out + rng.uniform(60, 190, 3)


def _noisy(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _photo_inputs(root: Path, n_images: int, n_videos: int, image_size: int, video_size: int) -> None:
    from fusion.data.shards import write_index
    from fusion.data.tar import ShardWriter
    from fusion.data.toy import video_meta
    from fusion.data.video import encode_frames, encoded_size

    rng = np.random.default_rng(0)
    files, lines = root / "files", []
    files.mkdir()
    long_side = image_size * 4 // 3
    for i in range(n_images):
        w, h = (long_side, image_size) if i % 2 == 0 else (image_size, long_side)
        buf = io.BytesIO()
        Image.fromarray(_noisy(rng, _texture(rng, h, w))).save(buf, "JPEG", quality=JPEG_QUALITY)
        (files / f"p{i:06d}.jpg").write_bytes(buf.getvalue())
        lines.append(json.dumps({"image": f"files/p{i:06d}.jpg", "caption": _caption(rng)}))
    (root / "images.jsonl").write_text("\n".join(lines) + "\n")
    for start in range(0, n_images, SAMPLES_PER_SHARD):
        with ShardWriter(root / "image", start // SAMPLES_PER_SHARD) as writer:
            for i in range(start, min(n_images, start + SAMPLES_PER_SHARD)):
                record = json.loads(lines[i])
                data = (root / record["image"]).read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    size = {"width": im.width, "height": im.height}
                writer.write(
                    f"p{i:06d}",
                    {"jpg": data, "txt": record["caption"], "json": {**size, "source": record["image"]}},
                )
    write_index(root / "image", "image")
    vw, vh = encoded_size(video_size * 4 // 3, video_size, 0)
    for start in range(0, n_videos, SAMPLES_PER_SHARD):
        with ShardWriter(root / "video", start // SAMPLES_PER_SHARD) as writer:
            for i in range(start, min(n_videos, start + SAMPLES_PER_SHARD)):
                scene = _texture(rng, vh + PHOTO_FRAMES * 2, vw + PHOTO_FRAMES * 3)
                frames = np.stack(
                    [_noisy(rng, scene[2 * t : 2 * t + vh, 3 * t : 3 * t + vw]) for t in range(PHOTO_FRAMES)]
                )  # (F, H, W, 3): a pan
                data = encode_frames(frames, PHOTO_FPS, crf=23, keyframe_interval=8)
                writer.write(f"v{i:06d}", {"mp4": data, "txt": _caption(rng), "json": video_meta(data)})
    write_index(root / "video", "video")


# ---------------------------------------------------------------- measuring


def tree_cpu() -> float:
    """CPU seconds used so far by this process (every thread), its reaped children and every live
    descendant (DataLoader workers, process pools), from /proc (without /proc: this process and
    its reaped children only)."""
    t = os.times()  # children: clock ticks; this process: process_time, finer
    total = time.process_time() + t.children_user + t.children_system
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return total
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)"
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)], stats[int(entry)] = int(fields[1]), fields
    tick = os.sysconf("SC_CLK_TCK")
    mine = {os.getpid()}
    added = True
    while added:
        added = False
        for pid, ppid in parents.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                added = True
    for pid in mine - {os.getpid()}:
        total += sum(int(x) for x in stats[pid][11:15]) / tick  # utime stime cutime cstime
    return total


def timed(fn) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of this process tree) of one run of `fn`."""
    cpu = tree_cpu()
    n, seconds = fn()
    return n, seconds, tree_cpu() - cpu


def measure(subject, reference, warmup, repeats: int) -> dict:
    """Warm both up, then alternate reference and subject; best rate of each, by wall clock and by
    CPU time of the whole process tree."""
    warmup()
    reference()
    subj, ref = [], []
    for _ in range(repeats):
        ref.append(timed(reference))
        subj.append(timed(subject))

    def best(runs, i):
        return max(r[0] / r[i] for r in runs)

    out = {
        "subject_rate": best(subj, 1),
        "reference_rate": best(ref, 1),
        "subject_runs": [[n, round(s, 4)] for n, s, _ in subj],
        "reference_runs": [[n, round(s, 4)] for n, s, _ in ref],
        "spread": {
            "subject": _spread(subj),
            "reference": _spread(ref),
            "ratio_of_paired_runs": [round((a[0] / a[1]) / (b[0] / b[1]), 3) for a, b in zip(subj, ref)],
        },
    }
    if all(r[2] > 0 for r in subj + ref):
        out.update(
            subject_cpu_rate=best(subj, 2),
            reference_cpu_rate=best(ref, 2),
            cpu_ratio=best(subj, 2) / best(ref, 2),
        )
    return out


def _spread(runs) -> list[float]:
    """[slowest, fastest] rate of the timed runs."""
    rates = [n / s for n, s, _ in runs]
    return [round(min(rates), 1), round(max(rates), 1)]


def pin_cpus(processes: int) -> list[int] | None:
    """Restrict this process (and every child) to `processes` CPUs; None if there are too few."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    if processes > len(cpus):
        print(f"bench_data: warning: --processes {processes} > {len(cpus)} CPUs: not pinned", file=sys.stderr)
        return None
    os.sched_setaffinity(0, cpus[:processes])
    return cpus[:processes]


def machine_info() -> dict:
    import PIL
    import torch

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }
    for name in ("decord", "av"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            platform.processor(),
        )
    except OSError:
        cpu = platform.processor()
    return {"cpu_count": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "versions": versions}


def table(results: list[dict]) -> str:
    head = (
        f"{'what':<9}{'subject':<28}{'reference':<28}{'subject/s':>10}{'ref/s':>9}{'ratio':>7}"
        f"{'cpu ratio':>10}{'target':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        cpu = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "-"
        lines.append(
            f"{r['what']:<9}{r['subject_short']:<28}{r['reference_short']:<28}"
            f"{r['subject_rate']:>10,.0f}{r['reference_rate']:>9,.0f}{r['ratio']:>7.2f}"
            f"{cpu:>10}{'>= ' + format(r['target'], '.1f'):>8}" + ("" if r["met"] else "  missed")
        )
    lines.append("")
    for r in results:
        lines.append(
            f"{r['what']}: {r['subject']}\n{' ' * len(r['what'])}  vs {r['reference']}\n"
            f"{' ' * len(r['what'])}  paired-run ratios {r['spread']['ratio_of_paired_runs']}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--inputs",
        choices=sorted(DEFAULTS),
        default="toy",
        help="toy: 64 px toy pictures and clips, the worst case for fixed per-sample "
        "costs; photo: photo-like JPEGs and textured H.264 clips (default toy)",
    )
    p.add_argument(
        "--workdir",
        default="runs/bench_data",
        help="inputs (one folder per input kind and size, reused when the settings "
        "match) and scratch output (default: runs/bench_data)",
    )
    p.add_argument("--n-images", type=int, default=None, help="image samples (default 2000 toy, 500 photo)")
    p.add_argument("--n-videos", type=int, default=None, help="video samples (default 200 toy, 100 photo)")
    p.add_argument(
        "--processes", type=int, default=1, help="processes (and CPUs) given to each side (default 1)"
    )
    p.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="data.num_workers of the loader (default processes - 1: the main process "
        "is one of the processes)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="toy: side of the pictures and video frames (default 64); photo: shorter "
        "side of the pictures, the longer one is 4/3 of it (default 384)",
    )
    p.add_argument(
        "--video-size",
        type=int,
        default=None,
        help="photo: shorter side of the clips, 4:3 (default 256); toy clips have --image-size",
    )
    p.add_argument(
        "--crop",
        type=int,
        default=None,
        help="side of the square the loader crops (model.vision.img_size) and the "
        "builder stores (default: half of --image-size, a multiple of 8, for toy; "
        "224 for photo)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side (default 3)")
    p.add_argument("--out", default=None, help="JSON results (default: WORKDIR/results-INPUTS-pP[-wN].json)")
    args = p.parse_args(argv)
    d = DEFAULTS[args.inputs]
    for key in ("n_images", "n_videos", "image_size"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    if args.inputs == "toy":
        args.video_size = args.image_size
    elif args.video_size is None:
        args.video_size = d["video_size"]
    if args.loader_workers is None:
        args.loader_workers = args.processes - 1
    if min(args.n_images, args.n_videos, args.processes, args.repeats) < 1:
        p.error("--n-images, --n-videos, --processes and --repeats must be >= 1")
    if args.loader_workers < 0:
        p.error("--loader-workers must be >= 0")
    if args.inputs == "photo" and min(args.image_size, args.video_size) < 16:
        p.error("--image-size and --video-size must be >= 16")
    command = "python tools/bench_data.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    crop = args.crop or d["crop"] or max(8, args.image_size // 2 // 8 * 8)
    if crop % patch_size(crop):
        p.error(f"--crop {crop} must be a multiple of {patch_size(crop)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workers = "" if args.loader_workers == args.processes - 1 else f"-w{args.loader_workers}"
    out = Path(args.out) if args.out else workdir / f"results-{args.inputs}-p{args.processes}{workers}.json"

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    print(
        f"inputs: {args.inputs}, {args.n_images} images at {args.image_size} px, "
        f"{args.n_videos} videos at {args.video_size} px in {workdir} ...",
        flush=True,
    )
    inputs = make_inputs(workdir, args.inputs, args.n_images, args.n_videos, args.image_size, args.video_size)
    print(
        f"inputs {'reused' if inputs['reused'] else 'built'} in {inputs['seconds']} s "
        f"({inputs['root']}, {inputs['image_bytes']:,} bytes per picture)",
        flush=True,
    )

    import torch

    cpus = pin_cpus(args.processes)
    torch.set_num_threads(args.processes)
    pool = None
    if args.processes > 1:
        import multiprocessing

        # spawn: the parent holds torch (and later DataLoader workers); the loops need neither
        pool = multiprocessing.get_context("spawn").Pool(args.processes)

    results = []
    try:
        # 1. images: loader vs tar read + Pillow decode + resize/crop
        loader = Loader(
            "image", str(Path(inputs["image_shards"][0]).parent), args.n_images, args.loader_workers, crop
        )
        ref = Reference(raw_images, inputs["image_shards"], args.processes, pool, size=crop)
        print("measuring images ...", flush=True)
        r = measure(loader, ref, lambda: loader.take(max(300, args.n_images // 4)), args.repeats)
        results.append(
            {
                "what": "images",
                "subject": loader.describe(),
                "subject_short": f"loader, {loader.num_workers} workers",
                "reference_short": "tar + Pillow loop",
                "reference": f"tarfile read + Image.open().convert('RGB') + bicubic resize "
                f"+ centre crop to {crop}, {args.processes} process(es)",
                "samples": args.n_images,
                "failures": loader.close(),
                **r,
            }
        )

        # 2. videos: loader vs tar read + decord get_batch of the same indices + resize/crop
        loader = Loader(
            "video", str(Path(inputs["video_shards"][0]).parent), args.n_videos, args.loader_workers, crop
        )
        ref = Reference(
            raw_videos, inputs["video_shards"], args.processes, pool, size=crop, n_frames=N_FRAMES
        )
        print("measuring videos ...", flush=True)
        r = measure(loader, ref, lambda: loader.take(max(50, args.n_videos // 4)), args.repeats)
        results.append(
            {
                "what": "videos",
                "subject": loader.describe(),
                "subject_short": f"loader, {loader.num_workers} workers",
                "reference_short": "tar + decord + Pillow loop",
                "reference": f"tarfile read + decord VideoReader(num_threads=1).get_batch"
                f"({N_FRAMES} segment_middle indices) + bicubic resize + centre "
                f"crop to {crop}, {args.processes} process(es)",
                "samples": args.n_videos,
                "failures": loader.close(),
                **r,
            }
        )

        # 3. builder: fusion-data images vs read + decode + resize + encode
        builder = Builder(
            inputs["jsonl"], workdir / "built", len(inputs["image_files"]), args.processes, crop
        )
        ref = Reference(raw_builds, inputs["image_files"], args.processes, pool, size=crop)
        print("measuring builder ...", flush=True)
        r = measure(builder, ref, builder, args.repeats)
        results.append(
            {
                "what": "builder",
                "subject": builder.describe(),
                "subject_short": f"fusion-data images -w {args.processes}",
                "reference_short": "Pillow decode+fit+JPEG loop",
                "reference": f"read file + Image.open().load() + convert RGB + ImageOps.fit"
                f"({crop}, LANCZOS) + JPEG q{JPEG_QUALITY}, "
                f"{args.processes} process(es)",
                "samples": builder.n,
                "failures": {},
                **r,
            }
        )
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    for r in results:
        r["ratio"] = r["subject_rate"] / r["reference_rate"]
        r["target"] = TARGETS[r["what"]]
        r["met"] = r["ratio"] >= r["target"]
    report = {
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now().astimezone() - started).total_seconds(), 1),
        "machine": {
            **machine_info(),
            "pinned_cpus": cpus,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "inputs": args.inputs,
            "n_images": args.n_images,
            "n_videos": args.n_videos,
            "processes": args.processes,
            "loader_workers": args.loader_workers,
            "image_size": args.image_size,
            "video_size": args.video_size,
            "crop": crop,
            "patch_size": patch_size(crop),
            "bytes_per_picture": inputs["image_bytes"],
            "repeats": args.repeats,
            "statistic": "best of repeats",
            "samples_per_shard": SAMPLES_PER_SHARD,
            "inputs_reused": inputs["reused"],
        },
        "results": results,
    }
    print()
    print(table(results))
    print(
        f"\nload average before {report['machine']['loadavg_before']}, after "
        f"{report['machine']['loadavg_after']}; CPUs used {cpus}; {report['seconds']} s"
    )
    for r in results:
        if r["failures"]:
            print(
                f"bench_data: warning: {r['what']}: the loader counted failures {r['failures']}: "
                f"its rate includes samples it could not use",
                file=sys.stderr,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
