"""Config and CLI input: every tool rejects nonsense with one line naming the key, flag
or file, and a non-zero exit, before any work starts."""

from __future__ import annotations

import pytest

from fusion.checkpoint import export_model, write_manifest
from fusion.config import ConfigError, load_config
from fusion.data.build import main as fusion_data
from fusion.data.tokenizer import ByteTokenizer
from fusion.eval.cli import main as fusion_eval
from fusion.model.fusion import build_model
from fusion.train import main as fusion_train
from tests.conftest import BIN, run_cli


def one_line(text: str) -> str:
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.micro_batch=-1", "train.micro_batch"),
        ("model.dim=-5", "model.dim"),
        ("model.vision.img_size=-32", "model.vision.img_size"),
        ("model.moe.n_experts=-4", "model.moe.n_experts"),
        ("model.moe.top_k=5", "model.moe.top_k"),
        ("data.image=x train.seq_len=8", "train.seq_len"),  # one image is 16 + 2 tokens
        ("data.video=x train.seq_len=64", "train.seq_len"),  # 8 frames do not fit
        ("train.betas=[0.9,1.5]", "train.betas"),
        ("train.min_lr_ratio=-1", "train.min_lr_ratio"),
        ("model.norm_eps=0", "model.norm_eps"),
        ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
        ("train.max_nonfinite=-2", "train.max_nonfinite"),
        ("data.weights=[1,-1,1]", "data.weights"),
    ],
)
def test_config_nonsense_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert f"'{key}'" in one_line(str(e.value))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.text=MISSING"], "config key 'data.text': shards not found"),
        (["data.text=EMPTY"], "config key 'data.text': no .tar shards in directory"),
        (["data.text="], "config keys 'data.text', 'data.image', 'data.video' are all empty"),
        (["data.text=SHARDS", "data.image=MISSING"], "config key 'data.image': shards not found"),
        (["data.text=SHARDS", "data.eval=MISSING", "train.eval_every=5"], "config key 'data.eval'"),
        (["data.text=SHARDS", "data.tokenizer=MISSING"], "config key 'data.tokenizer'"),
        (["data.text=SHARDS", "train.resume=MISSING"], "config key 'train.resume'"),
        (["data.text=SHARDS", "model.moe.top_k=9"], "config key 'model.moe.top_k'"),
    ],
)
def test_fusion_train_refuses_before_starting(overrides, message, text_shards, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    subst = {
        "MISSING": str(tmp_path / "missing"),
        "EMPTY": str(tmp_path / "empty"),
        "SHARDS": str(text_shards),
    }
    args = []
    for o in overrides:
        for placeholder, value in subst.items():
            o = o.replace(placeholder, value)
        args.append(o)
    assert fusion_train(["--config", "configs/debug.yaml", f"run.dir={tmp_path / 'run'}", *args]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("fusion-train: error: ") and message in line, line
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize("workers", [0, 1])
def test_fusion_train_on_unreadable_shards_stops_with_one_line(workers, tmp_path):
    """Shards that exist but hold no readable sample (checked only once reading starts, also inside
    a DataLoader worker, whose traceback is not shown)."""
    shards = tmp_path / "garbage"
    shards.mkdir()
    (shards / "000000.tar").write_bytes(b"\x89 not a tar" * 300)
    r = run_cli(
        [
            str(BIN / "fusion-train"),
            "--config",
            "configs/debug.yaml",
            f"data.text={shards}",
            "train.steps=2",
            f"data.num_workers={workers}",
            f"run.dir={tmp_path / 'run'}",
        ],
        timeout=300,
    )
    assert r.returncode == 1
    line = one_line("\n".join(l for l in r.stderr.splitlines() if "error" in l.lower()))
    assert line.startswith("fusion-train: error: no readable samples") and str(shards) in line, r.stderr[
        -2000:
    ]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["text", "--input", "MISSING", "--output", "OUT"], "--input: no such file"),
        (["images", "--input", "MISSING", "--output", "OUT"], "--input: no such file"),
        (
            ["text", "--input", "MISSING", "--output", "OUT", "--samples-per-shard", "-5"],
            "--samples-per-shard",
        ),
        (["verify", "MISSING"], "no such directory"),
        (["stats", "MISSING"], "no such directory"),
    ],
)
def test_fusion_data_refuses(argv, message, tmp_path, capsys):
    argv = [
        a.replace("MISSING", str(tmp_path / "missing")).replace("OUT", str(tmp_path / "out")) for a in argv
    ]
    try:
        rc = fusion_data(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    assert rc != 0
    assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_fusion_eval_refuses_missing_dirs_bad_flags_and_a_damaged_checkpoint(text_shards, tmp_path, capsys):
    cfg = load_config(None, ["model.dim=32", "model.n_heads=2", "model.n_kv_heads=1"])
    step = tmp_path / "run" / "checkpoints" / "step_2"
    export_model(build_model(cfg.model, ByteTokenizer()), cfg, step)
    write_manifest(step, 2, world_size=1)
    (step.parent / "latest").write_text("step_2")
    run, vqa = str(tmp_path / "run"), str(text_shards)
    cases = [
        (["--run", str(tmp_path / "nope"), "--vqa", vqa], "--run"),
        (["--run", run, "--vqa", str(tmp_path / "nope")], "--vqa"),
        (["--run", run, "--vqa", vqa, "--limit", "-1"], "--limit"),
        (["--run", run, "--vqa", vqa, "--n-frames", "0"], "--n-frames"),
    ]
    for argv, flag in cases:
        assert fusion_eval(argv) != 0
        assert flag in one_line(capsys.readouterr().err)
    weights = step / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fusion_eval(["--run", run, "--vqa", vqa, "--no-progress"]) != 0
    assert "file model.safetensors was altered" in one_line(capsys.readouterr().err)
