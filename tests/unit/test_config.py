import subprocess
import sys

import pytest

from fusion.config import SIZES, ConfigError, deepspeed_config, dump_yaml, finalize, load_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_a_working_debug_run():
    cfg = load_config()
    assert cfg.model.size == "debug"
    assert cfg.model.dim == SIZES["debug"]["dim"]


def test_spec_keys_exist():
    keys = [
        "model.size=demo",
        "model.vision.encoder=vit_tiny_patch16_224",
        "model.moe.n_experts=8",
        "model.moe.top_k=2",
        "model.moe.n_shared=0",
        "model.moe.every=2",
        "model.moe.balance=aux",
        "data.text=/x",
        "data.image=/y",
        "data.video=/z",
        "data.weights=[1,2,3]",
        "data.alpha=0.5",
        "train.steps=7",
        "train.seed=3",
        "train.micro_batch=2",
        "train.seq_len=512",
        "train.lr=0.1",
        "train.ckpt_every=5",
        "train.resume=none",
        "train.log_every=2",
        "train.eval_every=4",
        "data.eval=/v",
        "run.dir=/tmp/r",
    ]
    cfg = load_config(None, keys)
    assert cfg.model.moe.n_experts == 8 and cfg.model.moe.top_k == 2
    assert cfg.data.weights == [1.0, 2.0, 3.0] and cfg.train.lr == 0.1 and cfg.run.dir == "/tmp/r"


def test_precedence_size_then_yaml_then_cli(tmp_path):
    p = write(tmp_path, "model:\n  size: demo\n  dim: 96\ntrain:\n  steps: 11\n")
    cfg = load_config(p, ["train.steps=12"])
    assert cfg.model.n_layers == SIZES["demo"]["n_layers"]  # from the size
    assert cfg.model.dim == 96  # YAML beats the size
    assert cfg.train.steps == 12  # CLI beats YAML
    cfg = load_config(p, ["model.size=small"])  # CLI size, YAML dim still wins
    assert cfg.model.n_layers == SIZES["small"]["n_layers"] and cfg.model.dim == 96


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "model:\n  moe:\n    n_expert: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "model.moe.n_expert" in msg and str(p) in msg and "n_experts" in msg


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match="'model.moe.n_expert' in the command line"):
        load_config(None, ["model.moe.n_expert=4"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.steps=ten", "train.steps"),
        ("train.lr=[1]", "train.lr"),
        ("train.lr=fast", "train.lr"),
        ("model.moe.top_k=1.5", "model.moe.top_k"),
        ("model.tie_embeddings=3", "model.tie_embeddings"),
        ("data.weights=abc", "data.weights"),
    ],
)
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.moe.top_k=9", "model.moe.top_k"),
        ("model.moe.balance=magic", "model.moe.balance"),
        ("train.seq_len=0", "train.seq_len"),
        ("model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.size=huge", "model.size"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("data.weights=[1,2]", "data.weights"),
        ("train.log_every=0", "train.log_every"),
    ],
)
def test_nonsense_values_rejected(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_exponent_without_dot_is_a_float(tmp_path):
    assert load_config(None, ["train.lr=3e-3"]).train.lr == 3e-3
    assert load_config(write(tmp_path, "train:\n  lr: 1e-4\n")).train.lr == 1e-4


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_every_named_size_and_shipped_config_loads():
    for size in SIZES:
        load_config(None, [f"model.size={size}"])
    for name in ["debug", "demo", "small"]:
        load_config(f"configs/{name}.yaml")


def test_derived_and_deepspeed_json():
    cfg = load_config(
        None,
        [
            "train.micro_batch=3",
            "train.grad_accum=2",
            "model.n_layers=4",
            "model.moe.every=2",
            "train.deepspeed={zero_optimization: {reduce_bucket_size: 7}}",
        ],
    )
    d = finalize(cfg, world_size=4)
    assert d.global_batch == 24 and d.moe_layers == [1, 3]
    ds = deepspeed_config(cfg, 4, bf16=False)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 7}


def test_deepspeed_keys_one_at_a_time_merge_with_the_yaml(tmp_path):
    path = write(
        tmp_path,
        "train:\n  deepspeed:\n    zero_optimization: {overlap_comm: false, reduce_bucket_size: 7}\n",
    )
    cfg = load_config(
        path,
        [
            "train.deepspeed.zero_optimization.overlap_comm=true",
            "train.deepspeed.wall_clock_breakdown=true",
            "train.deepspeed={zero_optimization: {contiguous_gradients: true}}",
        ],
    )
    assert cfg.train.deepspeed == {
        "zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 7, "contiguous_gradients": True},
        "wall_clock_breakdown": True,
    }
    with pytest.raises(ConfigError, match="train.deepspeed.a.b"):
        load_config(None, ["train.deepspeed.a=1", "train.deepspeed.a.b=2"])


def test_a_runs_config_yaml_loads_back_and_empty_sections_are_no_override(tmp_path):
    cfg = load_config("configs/debug.yaml", ["train.steps=7", "train.deepspeed.steps_per_print=5"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg, {"git_sha": "abc", "versions": {"torch": "x"}}))
    assert load_config(path) == cfg  # the provenance section is not a setting
    empty = write(tmp_path, "train:\n  # steps: 3\nmodel:\n  size: debug\n")
    assert load_config(empty).train == load_config(None).train


def test_wrong_key_fails_fast_with_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "fusion.train", "--config", "configs/debug.yaml", "model.moe.n_expert=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if "error" in l]
    assert len(lines) == 1 and "model.moe.n_expert" in lines[0], r.stderr


def test_eval_every_needs_eval_sets():
    with pytest.raises(ConfigError, match="train.eval_every.*data.eval"):
        load_config(None, ["train.eval_every=5"])
