"""fusion-eval's inputs and outputs as README and docs/shards.md, docs/run-directory.md describe them: video VQA shards from plain
`tarfile` (a `.json` with only the VQA fields), `--checkpoint DIR --vqa DIR` without `--out`, results never
inside a checkpoint, SET named as the user named it, and one error line (never a traceback) for a
broken model directory or a closed stdout."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from fusion.checkpoint import export_model, verify_checkpoint, write_manifest
from fusion.config import load_config
from fusion.data.samples import SampleMaker
from fusion.data.shards import ErrorCounter
from fusion.data.tar import ShardWriter, iter_samples
from fusion.data.tokenizer import ByteTokenizer
from fusion.eval import cli, questions, runs, vqa
from fusion.model.fusion import build_model
from tests.conftest import encode_mp4, square_frame
from tests.unit.test_eval import png

SMALL = ["model.vision.img_size=32", "model.vision.patch_size=8"]
FAST = ["--limit", "2", "--no-blind", "--examples", "0", "--no-progress"]


def tiny_model(seed: int = 0, extra=()):
    cfg = load_config(None, SMALL + list(extra))
    torch.manual_seed(seed)
    return build_model(cfg.model, ByteTokenizer()).eval(), cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN/checkpoints/step_2 as training saves it: manifest.json covers every file there."""
    model, cfg = tiny_model()
    run = tmp_path_factory.mktemp("runs") / "tiny"
    step = run / "checkpoints" / "step_2"
    export_model(model, cfg, step)
    write_manifest(step, 2, 1)
    (run / "checkpoints" / "latest").write_text("step_2")
    return run


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa") / "out_nums"
    with ShardWriter(root, 0) as w:
        for i, answer in enumerate(["red", "blue"]):
            w.write(
                f"q{i}",
                {
                    "png": png(square_frame(answer, 4, 4)),
                    "json": {
                        "question": "What color is the square?",
                        "answer": answer,
                        "choices": ["red", "blue"],
                        "type": "color",
                    },
                },
            )
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def plain_video_set(tmp_path_factory):
    """A VQA shard (docs/shards.md) written with plain tarfile: `.mp4` + `.json` {question, answer, choices[, type]}
    and nothing else (no fps / n_frames / size, no index.json, no stats); the second sample has no
    type."""
    root = tmp_path_factory.mktemp("plain") / "video_qa"
    root.mkdir()
    with tarfile.open(root / "000000.tar", "w") as tar:
        for i, (direction, qtype) in enumerate([("right", "direction"), ("left", None)]):
            xs = [2 + 3 * f for f in range(6)]
            frames = [square_frame("red", x if direction == "right" else 22 - x, 11) for x in xs]
            meta = {
                "question": "Which way does the square move?",
                "answer": direction,
                "choices": ["left", "right"],
            }
            if qtype:
                meta["type"] = qtype
            add_member(tar, f"clip{i}.mp4", encode_mp4(frames))
            add_member(tar, f"clip{i}.json", json.dumps(meta).encode())
    return root


def test_video_vqa_with_a_spec_only_json_evaluates_and_trains(run, plain_video_set):
    model = runs.load_for_eval(run)[0]
    r = vqa.evaluate(model, plain_video_set, n_frames=4, progress=False)
    assert r["skipped"] == 0, r["skipped_reasons"]
    assert r["overall"]["n"] == 2
    assert {t: s["n"] for t, s in r["by_type"].items()} == {"direction": 1, "default": 1}

    cfg = load_config(None, SMALL + ["data.n_frames=4"])
    counter = ErrorCounter()
    maker = SampleMaker(cfg, ByteTokenizer(), train=True, counter=counter)
    samples = [maker(raw) for raw in iter_samples(str(plain_video_set), counter)]
    assert counter.total == 0, dict(counter.counts)
    assert [s["modality"] for s in samples] == [2, 2]
    assert all(s["videos"][0].shape == (4, 3, 32, 32) for s in samples)


def test_a_question_without_a_type_has_the_builders_default_type(run):
    maker = questions.make_sample_maker(runs.load_for_eval(run)[0], n_frames=4)
    for qtype, expected in ((None, "default"), ("  ", "default"), (" color ", "color")):
        meta = {"question": "What color?", "answer": "red", "choices": ["red", "blue"]}
        if qtype is not None:
            meta["type"] = qtype
        raw = {"__key__": "k", "png": png(square_frame("red", 4, 4)), "json": json.dumps(meta).encode()}
        assert questions.make_question(raw, maker).type == expected


def test_checkpoint_without_out_writes_the_runs_eval_never_a_checkpoint(run, image_set, tmp_path, capsys):
    step = run / "checkpoints" / "step_2"
    for source in (
        ["--run", str(step)],
        ["--checkpoint", str(step)],
        ["--checkpoint", str(run / "checkpoints")],
        ["--run", str(run)],
    ):
        target = run / "eval" / "out_nums.json"
        target.unlink(missing_ok=True)
        assert cli.main(source + ["--vqa", str(image_set)] + FAST) == 0, capsys.readouterr().err
        assert f"-> {target}" in capsys.readouterr().out
        assert json.loads(target.read_text())["overall"]["n"] == 2
        assert not (step / "eval").exists()
        verify_checkpoint(step)  # resuming still accepts it

    # a model dir outside any run, without a manifest (fusion-convert from-hf writes these)
    model, cfg = tiny_model()
    export_model(model, cfg, tmp_path / "converted")
    assert cli.main(["--checkpoint", str(tmp_path / "converted"), "--vqa", str(image_set)] + FAST) == 0
    assert (tmp_path / "converted" / "eval" / "out_nums.json").is_file()

    # an explicit --out inside a checkpoint is refused, naming it
    capsys.readouterr()
    assert cli.main(["--run", str(run), "--vqa", str(image_set), "--out", str(step / "eval")] + FAST) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "inside checkpoint" in err, err
    assert not (step / "eval").exists()
    verify_checkpoint(step)


def test_set_is_named_as_the_user_named_its_directory(run, image_set, tmp_path, capsys):
    link = tmp_path / "myset"
    link.symlink_to(image_set)
    out = tmp_path / "out"
    assert cli.main(["--run", str(run), "--vqa", str(link) + "/", "--out", str(out)] + FAST) == 0
    assert sorted(p.name for p in out.iterdir()) == ["myset.json"]
    assert json.loads((out / "myset.json").read_text())["set"] == "myset"


def broken_model_dirs(root):
    """(directory, words its error must contain): model dirs without a manifest, each broken once."""
    model, cfg = tiny_model()
    cases = []

    def fresh(name):
        export_model(model, cfg, root / name)
        return root / name

    (fresh("bad_json") / "model.json").write_text('{"model": {"dim": 64,')
    cases.append((root / "bad_json", ["model.json", "not valid JSON"]))
    meta = json.loads((fresh("no_model_key") / "model.json").read_text())
    del meta["model"]
    (root / "no_model_key" / "model.json").write_text(json.dumps(meta))
    cases.append((root / "no_model_key", ["model.json", "'model'"]))
    meta = json.loads((fresh("bad_value") / "model.json").read_text())
    meta["model"]["dim"] = "wide"
    (root / "bad_value" / "model.json").write_text(json.dumps(meta))
    cases.append((root / "bad_value", ["model.json", "model.dim"]))
    weights = fresh("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases.append((root / "truncated", ["model.safetensors", "not a readable safetensors file"]))
    other, other_cfg = tiny_model(extra=["model.dim=32"])  # every decoder weight changes shape
    export_model(other, other_cfg, root / "wider")
    fresh("mismatch")
    os.replace(root / "wider" / "model.safetensors", root / "mismatch" / "model.safetensors")
    cases.append((root / "mismatch", ["model.safetensors", "wrong shape", "and ", "more"]))
    return cases


def test_a_broken_model_dir_is_one_error_line(image_set, tmp_path, capsys):
    from fusion.checkpoint import CheckpointError, load_model

    for directory, words in broken_model_dirs(tmp_path):
        with pytest.raises(CheckpointError) as e:
            load_model(directory)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
        assert len(str(e.value)) < 500  # names a few, not every weight
        assert cli.main(["--checkpoint", str(directory), "--vqa", str(image_set)] + FAST) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("fusion-eval: error:")
        assert all(w in err for w in words), err
        assert not (directory / "eval").exists()


def run_into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a command whose stdout reader is gone before it writes anything (as `| head` leaves it)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)


def test_results_into_a_closed_pipe_are_no_traceback(run, image_set, tmp_path):
    r = run_into_closed_pipe(
        [
            sys.executable,
            "-m",
            "fusion.eval.cli",
            "--run",
            str(run),
            "--vqa",
            str(image_set),
            "--out",
            str(tmp_path),
        ]
        + FAST
    )
    assert r.stderr == "" and r.returncode == 141, r.stderr  # 128 + SIGPIPE, as `cat` gives
    assert json.loads((tmp_path / "out_nums.json").read_text())["overall"]["n"] == 2
