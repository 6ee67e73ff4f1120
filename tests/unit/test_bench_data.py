"""tools/bench_data.py runs end to end on tiny photo-like inputs and reports what it measured.

No rate is asserted (timing is never a test): only that every measurement happened on the samples
it names, that the ratios are the quotients of the rates, and that nothing failed.
"""

from __future__ import annotations

import json
import sys

from tests.conftest import ROOT, run_cli


def test_photo_inputs_are_measured_and_reported(tmp_path):
    work = tmp_path / "bench"
    r = run_cli(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_data.py"),
            "--inputs",
            "photo",
            "--n-images",
            "6",
            "--n-videos",
            "2",
            "--image-size",
            "48",
            "--video-size",
            "32",
            "--crop",
            "32",
            "--repeats",
            "1",
            "--workdir",
            str(work),
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((work / "results-photo-p1.json").read_text())
    s = out["settings"]
    assert (s["inputs"], s["image_size"], s["video_size"], s["crop"], s["loader_workers"]) == (
        "photo",
        48,
        32,
        32,
        0,
    )
    assert s["bytes_per_picture"] > 1000  # textured JPEGs, not flat colour
    inputs = work / "photo-48-32"
    files = [json.loads(line) for line in (inputs / "images.jsonl").read_text().splitlines()]
    assert len(files) == 6 and all((inputs / f["image"]).is_file() for f in files)
    assert json.loads((inputs / "image" / "index.json").read_text())["n_samples"] == 6
    video_index = json.loads((inputs / "video" / "index.json").read_text())
    assert video_index["n_samples"] == 2
    rows = {x["what"]: x for x in out["results"]}
    assert set(rows) == {"images", "videos", "builder"}
    for what, x in rows.items():
        assert x["failures"] == {}, what
        assert x["subject_rate"] > 0 and x["reference_rate"] > 0
        assert abs(x["ratio"] - x["subject_rate"] / x["reference_rate"]) < 1e-9
        assert x["cpu_ratio"] > 0 and x["met"] == (x["ratio"] >= x["target"])
    assert rows["builder"]["subject_runs"][0][0] == 6  # the builder wrote every picture
    assert "images" in r.stdout and "cpu ratio" in r.stdout
    # a second run reuses the inputs instead of building them again
    r = run_cli(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_data.py"),
            "--inputs",
            "photo",
            "--n-images",
            "6",
            "--n-videos",
            "2",
            "--image-size",
            "48",
            "--video-size",
            "32",
            "--crop",
            "32",
            "--repeats",
            "1",
            "--workdir",
            str(work),
            "--out",
            str(tmp_path / "again.json"),
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "again.json").read_text())["settings"]["inputs_reused"] is True
