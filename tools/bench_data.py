"""Data-pipeline throughput as ratios to plain loops doing the same work, measured in one run.

    python tools/bench_data.py --n-images 2000 --n-videos 200 --processes 1 --out runs/bench_data/results.json

Inputs are built first (toy image and video shards from `fusion-data toy`, and the toy pictures
written out as files listed in a jsonl); they are kept in --workdir and reused when the settings
match. Then, on the same samples and on the same CPUs:

| what    | subject                                      | reference (a plain loop)                        | target |
|---------|----------------------------------------------|-------------------------------------------------|--------|
| images  | `build_batches` over the image shards        | tar members read, Pillow decode + resize + crop | >= 0.8 |
| videos  | `build_batches` over the video shards        | tar members read, decord (1 thread) get_batch of the same frame indices + resize + crop | >= 0.7 |
| builder | `fusion-data images` on the jsonl of files   | file read, Pillow decode + resize + JPEG encode | >= 0.8 |

Same process count: with `--processes P` the whole benchmark is pinned to P CPUs
(`sched_setaffinity`) and each side runs P processes. The loader's main process counts as one of
them (it packs rows and collates; workers read, decode and tokenise), so `data.num_workers = P - 1`,
and 0 (everything in the main process) for P = 1. The builder gets `--workers P` (in-process for
P = 1; its process pool starts inside the timed run, as it does for a user). References with P > 1
split the shards (files) round-robin over P processes started before timing. Videos use
`data.frame_strategy=segment_middle` so that the reference can decode the very same frames.

Each measurement is warmed up, then the subject and its reference alternate `--repeats` times (so
both see the same background load); the best rate of each is kept and the ratio is subject / reference.
The loader is timed on windows of `--n-images` (`--n-videos`) samples taken from one persistent
iterator, counted where the packer takes them from the DataLoader. Timing is never a test.
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
SAMPLES_PER_SHARD = 50      # toy shards: enough shards to split over workers without overlap
JPEG_QUALITY = 90
N_FRAMES = 8                # frames per video for the loader and the reference (data.n_frames)
PATCH = 8                   # model.vision.patch_size


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

    sampling = FrameSampling(strategy="segment_middle", n_frames=n_frames, pad="repeat_last",
                             min_frames=n_frames, max_frames=n_frames)
    n = 0
    for path in shards:
        for sample in tar_samples(path):
            meta = VideoMeta.from_json(json.loads(sample["json"]))
            indices = sample_frame_indices(meta, sampling)
            reader = decord.VideoReader(io.BytesIO(sample["mp4"]), ctx=decord.cpu(0), num_threads=1)
            frames = reader.get_batch(indices).asnumpy()             # (F, H, W, 3)
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

    def __init__(self, modality: str, spec: str, n: int, processes: int, img_size: int):
        from fusion.config import load_config, tokens_per_video
        from fusion.data.mixing import build_batches
        from fusion.data.tokenizer import ByteTokenizer

        self.num_workers = 0 if processes == 1 else processes - 1
        overrides = [f"data.{modality}={spec}", f"data.num_workers={self.num_workers}",
                     f"model.vision.img_size={img_size}", f"model.vision.patch_size={PATCH}",
                     f"data.n_frames={N_FRAMES}", "data.frame_strategy=segment_middle",
                     "train.micro_batch=8"]
        probe = load_config(None, [f"model.vision.img_size={img_size}",
                                   f"model.vision.patch_size={PATCH}"]).model.vision
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
        return (f"build_batches, {self.modality} only, num_workers={self.num_workers}, "
                f"seq_len={self.cfg.train.seq_len}, micro_batch={self.cfg.train.micro_batch}, "
                f"img_size={self.cfg.model.vision.img_size}"
                + (f", {d.n_frames} frames {d.frame_strategy}, backend {d.video_backend}"
                   if self.modality == "video" else ""))

    def close(self) -> dict:
        failures = self.batches.failures()
        self.batches = None          # drops the DataLoader iterators: workers exit
        return failures


class Builder:
    """`fusion-data images` into a fresh directory each time (a complete shard would be reused)."""

    def __init__(self, jsonl: Path, out_root: Path, n: int, processes: int, size: int):
        self.jsonl, self.out_root, self.n = jsonl, out_root, n
        self.spp = max(1, -(-n // (4 * processes)))   # 4 shards per worker: balanced
        self.flags = ["--workers", str(processes), "--samples-per-shard", str(self.spp),
                      "--max-side", str(size), "--resize-mode", "center_crop", "--format", "jpg",
                      "--quality", str(JPEG_QUALITY), "--no-progress"]
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

def make_inputs(workdir: Path, n_images: int, n_videos: int, image_size: int) -> dict:
    """Toy shards (reused when toy.json says the same settings) and the pictures as files."""
    from fusion.data.build import main as fusion_data

    toy = workdir / "toy"
    manifest = toy / "toy.json"
    want = {"image_size": image_size, "samples_per_shard": SAMPLES_PER_SHARD,
            "n_image": n_images, "n_video": n_videos}
    have = None
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        have = {"image_size": m.get("image_size"), "samples_per_shard": m.get("samples_per_shard"),
                "n_image": m.get("counts", {}).get("n_image"), "n_video": m.get("counts", {}).get("n_video")}
    t0 = time.perf_counter()
    if have != want:
        shutil.rmtree(workdir / "files", ignore_errors=True)
        zero = [f"--{k}" for k in ("n-text", "n-vqa-train", "n-vqa-test", "n-vqa-compositional",
                                     "n-video-vqa-train", "n-video-vqa-test")]
        argv = ["toy", "--output", str(toy), "--image-size", str(image_size),
                "--n-image", str(n_images), "--n-video", str(n_videos),
                "--samples-per-shard", str(SAMPLES_PER_SHARD), "--workers", str(os.cpu_count() or 1)]
        for flag in zero:
            argv += [flag, "0"]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            rc = fusion_data(argv)
        if rc != 0:
            raise RuntimeError(f"fusion-data toy exited {rc}: {log.getvalue()}")
    image_shards = sorted(str(p) for p in (toy / "image").glob("*.tar"))
    video_shards = sorted(str(p) for p in (toy / "video").glob("*.tar"))

    files, jsonl = workdir / "files", workdir / "images.jsonl"
    if not jsonl.is_file():
        files.mkdir(parents=True, exist_ok=True)
        lines = []
        for shard in image_shards:
            for key, sample in ((s["__key__"], s) for s in _keyed(shard)):
                (files / f"{key}.png").write_bytes(sample["png"])
                lines.append(json.dumps({"image": f"files/{key}.png",
                                         "caption": sample["txt"].decode()}))
        tmp = jsonl.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, jsonl)
    image_files = [str(workdir / json.loads(line)["image"]) for line in jsonl.read_text().splitlines()]
    return {"image_shards": image_shards, "video_shards": video_shards, "jsonl": jsonl,
            "image_files": image_files, "seconds": round(time.perf_counter() - t0, 1),
            "reused": have == want}


def _keyed(shard: str):
    with tarfile.open(shard) as tar:
        current: dict = {}
        for member in tar:
            key, _, ext = os.path.basename(member.name).partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext] = tar.extractfile(member).read()
        if current:
            yield current


# ---------------------------------------------------------------- measuring

def measure(subject, reference, warmup, repeats: int) -> dict:
    """Warm both up, then alternate reference and subject; best rate of each."""
    warmup()
    reference()
    subj, ref = [], []
    for _ in range(repeats):
        ref.append(reference())
        subj.append(subject())
    def best(runs):
        return max(n / s for n, s in runs)

    return {"subject_rate": best(subj), "reference_rate": best(ref),
            "subject_runs": [[n, round(s, 4)] for n, s in subj],
            "reference_runs": [[n, round(s, 4)] for n, s in ref]}


def pin_cpus(processes: int) -> list[int] | None:
    """Restrict this process (and every child) to `processes` CPUs; None if there are too few."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    if processes > len(cpus):
        print(f"bench_data: warning: --processes {processes} > {len(cpus)} CPUs: not pinned",
              file=sys.stderr)
        return None
    os.sched_setaffinity(0, cpus[:processes])
    return cpus[:processes]


def machine_info() -> dict:
    import PIL
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "pillow": PIL.__version__, "numpy": np.__version__}
    for name in ("decord", "av"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {"cpu_count": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "versions": versions}


def table(results: list[dict]) -> str:
    head = f"{'what':<9}{'subject':<28}{'reference':<26}{'subject/s':>10}{'ref/s':>9}{'ratio':>7}{'target':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['what']:<9}{r['subject_short']:<28}{r['reference_short']:<26}"
                     f"{r['subject_rate']:>10,.0f}{r['reference_rate']:>9,.0f}{r['ratio']:>7.2f}"
                     f"{'>= ' + format(r['target'], '.1f'):>8}" + ("" if r["met"] else "  missed"))
    lines.append("")
    for r in results:
        lines.append(f"{r['what']}: {r['subject']}\n{' ' * len(r['what'])}  vs {r['reference']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_data",
                   help="inputs and scratch output; inputs are reused when the settings match "
                        "(default: runs/bench_data)")
    p.add_argument("--n-images", type=int, default=2000, help="image samples (default 2000)")
    p.add_argument("--n-videos", type=int, default=200, help="video samples, 8-16 frames (default 200)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes (and CPUs) given to each side (default 1)")
    p.add_argument("--image-size", type=int, default=64,
                   help="side of the toy pictures and video frames; the loader crops to half of it "
                        "(a multiple of 8) and the builder stores that size (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side (default 3)")
    p.add_argument("--out", default=None, help="JSON results (default: WORKDIR/results.json)")
    args = p.parse_args(argv)
    if min(args.n_images, args.n_videos, args.processes, args.repeats) < 1:
        p.error("--n-images, --n-videos, --processes and --repeats must be >= 1")
    command = "python tools/bench_data.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    crop = max(PATCH, args.image_size // 2 // PATCH * PATCH)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir / "results.json"

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    print(f"inputs: {args.n_images} images, {args.n_videos} videos at {args.image_size} px "
          f"in {workdir} ...", flush=True)
    inputs = make_inputs(workdir, args.n_images, args.n_videos, args.image_size)
    print(f"inputs {'reused' if inputs['reused'] else 'built'} in {inputs['seconds']} s", flush=True)

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
        loader = Loader("image", str(Path(inputs["image_shards"][0]).parent), args.n_images,
                        args.processes, crop)
        ref = Reference(raw_images, inputs["image_shards"], args.processes, pool, size=crop)
        print("measuring images ...", flush=True)
        r = measure(loader, ref, lambda: loader.take(max(300, args.n_images // 4)), args.repeats)
        results.append({"what": "images", "subject": loader.describe(),
                        "subject_short": f"loader, {loader.num_workers} workers",
                        "reference_short": "tar + Pillow loop",
                        "reference": f"tarfile read + Image.open().convert('RGB') + bicubic resize "
                                     f"+ centre crop to {crop}, {args.processes} process(es)",
                        "samples": args.n_images, "failures": loader.close(), **r})

        # 2. videos: loader vs tar read + decord get_batch of the same indices + resize/crop
        loader = Loader("video", str(Path(inputs["video_shards"][0]).parent), args.n_videos,
                        args.processes, crop)
        ref = Reference(raw_videos, inputs["video_shards"], args.processes, pool, size=crop,
                        n_frames=N_FRAMES)
        print("measuring videos ...", flush=True)
        r = measure(loader, ref, lambda: loader.take(max(50, args.n_videos // 4)), args.repeats)
        results.append({"what": "videos", "subject": loader.describe(),
                        "subject_short": f"loader, {loader.num_workers} workers",
                        "reference_short": "tar + decord + Pillow loop",
                        "reference": f"tarfile read + decord VideoReader(num_threads=1).get_batch"
                                     f"({N_FRAMES} segment_middle indices) + bicubic resize + centre "
                                     f"crop to {crop}, {args.processes} process(es)",
                        "samples": args.n_videos, "failures": loader.close(), **r})

        # 3. builder: fusion-data images vs read + decode + resize + encode
        builder = Builder(inputs["jsonl"], workdir / "built", len(inputs["image_files"]),
                          args.processes, crop)
        ref = Reference(raw_builds, inputs["image_files"], args.processes, pool, size=crop)
        print("measuring builder ...", flush=True)
        r = measure(builder, ref, builder, args.repeats)
        results.append({"what": "builder", "subject": builder.describe(),
                        "subject_short": f"fusion-data images -w {args.processes}",
                        "reference_short": "Pillow decode+fit+JPEG loop",
                        "reference": f"read file + Image.open().load() + convert RGB + ImageOps.fit"
                                     f"({crop}, LANCZOS) + JPEG q{JPEG_QUALITY}, "
                                     f"{args.processes} process(es)",
                        "samples": builder.n, "failures": {}, **r})
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
        "machine": {**machine_info(), "pinned_cpus": cpus,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"n_images": args.n_images, "n_videos": args.n_videos,
                     "processes": args.processes, "image_size": args.image_size, "crop": crop,
                     "repeats": args.repeats, "statistic": "best of repeats",
                     "toy_samples_per_shard": SAMPLES_PER_SHARD,
                     "inputs_reused": inputs["reused"]},
        "results": results,
    }
    print()
    print(table(results))
    print(f"\nload average before {report['machine']['loadavg_before']}, after "
          f"{report['machine']['loadavg_after']}; CPUs used {cpus}; {report['seconds']} s")
    for r in results:
        if r["failures"]:
            print(f"bench_data: warning: {r['what']}: the loader counted failures {r['failures']}: "
                  f"its rate includes samples it could not use", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
