"""Checkpoint files: manifests, choosing a checkpoint to resume from, pruning, safe
loading. Directories are built here the way save_checkpoint lays them out; no training."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

import fusion
from fusion.checkpoint import (
    CheckpointError,
    export_model,
    prune_checkpoints,
    resolve_resume,
    safe_torch_load,
    verify_checkpoint,
    write_manifest,
)
from fusion.config import load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.fusion import build_model


class Payload:
    """Unpickling this runs `touch SENTINEL`."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def make_checkpoint(root, step: int, manifest: bool = True):
    d = root / "checkpoints" / f"step_{step}"
    d.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((3,), float(step))}}, d / "mp_rank_00_model_states.pt")
    (d / "rank0.json").write_text(f'{{"step": {step}}}')
    (d / "sub").mkdir()
    (d / "sub" / "extra.safetensors").write_bytes(b"x" * step)
    if manifest:
        write_manifest(d, step, world_size=1)
    return d


def point_latest(root, step: int):
    (root / "checkpoints" / "latest").write_text(f"step_{step}")


def test_manifest_lists_every_file_and_verifies(tmp_path):
    d = make_checkpoint(tmp_path, 4)
    m = verify_checkpoint(d)
    assert sorted(m["files"]) == ["mp_rank_00_model_states.pt", "rank0.json", "sub/extra.safetensors"]
    assert m["files"]["sub/extra.safetensors"]["bytes"] == 4 and len(m["files"]["rank0.json"]["sha256"]) == 64


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "rank0.json").unlink(), "file rank0.json is missing"),
        (
            lambda d: (d / "sub" / "extra.safetensors").write_bytes(b"x" * 5),
            "file sub/extra.safetensors has 5 bytes, manifest.json says 8",
        ),
        (
            lambda d: (d / "sub" / "extra.safetensors").write_bytes(b"x" * 7 + b"y"),
            "file sub/extra.safetensors was altered",
        ),
        (lambda d: (d / "evil.pt").write_bytes(b"\x80\x04N."), "file evil.pt is not in manifest.json"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is not a valid manifest"),
    ],
)
def test_auto_resume_refuses_a_damaged_checkpoint_naming_the_file_and_uses_the_previous(
    tmp_path, damage, message
):
    make_checkpoint(tmp_path, 4)
    newest = make_checkpoint(tmp_path, 8)
    point_latest(tmp_path, 8)
    assert resolve_resume("auto", tmp_path) == newest
    damage(newest)
    said = []
    chosen = resolve_resume("auto", tmp_path, log=said.append)
    assert chosen == tmp_path / "checkpoints" / "step_4"
    assert len(said) == 1 and "step_8" in said[0] and message in said[0], said
    # an explicit path to the damaged one is an error naming the key and the file
    with pytest.raises(CheckpointError, match="train.resume") as e:
        resolve_resume(str(newest), tmp_path)
    assert message in str(e.value)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_in_charge(tmp_path):
    make_checkpoint(tmp_path, 4)
    point_latest(tmp_path, 4)
    # killed while writing step 8: its files sit in .step_8.tmp, no manifest, latest unmoved
    tmp = tmp_path / "checkpoints" / ".step_8.tmp"
    tmp.mkdir()
    (tmp / "rank0.json").write_text("{")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_4"
    # killed after the rename but before `latest` moved: latest still decides
    make_checkpoint(tmp_path, 12)
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_4"


def test_auto_resume_without_checkpoints_and_with_none_usable(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("none", tmp_path) is None
    make_checkpoint(tmp_path, 4, manifest=False)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*train.resume=none starts over"):
        resolve_resume("auto", tmp_path, log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="train.resume"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_latest_is_a_tag_never_a_path(tmp_path):
    make_checkpoint(tmp_path, 4)
    outside = make_checkpoint(tmp_path / "elsewhere", 9)
    (tmp_path / "checkpoints" / "latest").write_text(str(outside))
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_4"
    (tmp_path / "checkpoints" / "latest").write_text("../elsewhere/checkpoints/step_9")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_4"


def test_prune_keeps_the_newest_k_and_the_latest(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    root = tmp_path / "checkpoints"
    point_latest(tmp_path, 4)  # e.g. resumed from 4 with newer ones left over
    prune_checkpoints(root, 2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_4", "step_6", "step_8"]
    point_latest(tmp_path, 8)
    prune_checkpoints(root, 1)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_8"]


def test_crafted_pickle_is_refused_by_the_loader_even_with_a_forged_manifest(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    d = make_checkpoint(tmp_path, 4)
    evil = d / "mp_rank_00_model_states.pt"
    legacy = pickle.dumps({"module": Payload(sentinel)})
    buf = io.BytesIO()
    torch.save({"module": Payload(sentinel)}, buf)  # torch's zip format, as DeepSpeed may write
    for data in (legacy, buf.getvalue()):
        evil.write_bytes(data)
        with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
            verify_checkpoint(d)
        write_manifest(d, 4, world_size=1)  # whoever planted it also rewrote the manifest
        verify_checkpoint(d)
        with pytest.raises(CheckpointError, match="refused by the weights-only loader"):
            safe_torch_load(evil)
        assert not sentinel.exists()
    # what DeepSpeed writes for ZeRO loads: tensors, containers and its allowlisted data classes
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ok = d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(
        {
            "optimizer_state_dict": {
                "loss_scaler": LossScaler(1.0),
                "zero_stage": ZeroStageEnum(1),
                "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0)}}},
            }
        },
        ok,
    )
    loaded = safe_torch_load(ok)
    assert loaded["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum(1)


def test_load_model_reads_only_safetensors_and_json(tmp_path):
    """fusion-eval's loader: the pickles beside the weights are never opened; an altered weights
    file in a training checkpoint is refused."""
    sentinel = tmp_path / "SENTINEL"
    cfg = load_config(None, ["model.dim=32", "model.n_heads=2", "model.n_kv_heads=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, ByteTokenizer()).eval()
    d = tmp_path / "run" / "checkpoints" / "step_3"
    export_model(model, cfg, d)
    for name in ("mp_rank_00_model_states.pt", "model.pt", "pytorch_model.bin"):
        (d / name).write_bytes(pickle.dumps(Payload(sentinel)))
    write_manifest(d, 3, world_size=1)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_3")
    loaded = fusion.load_model(tmp_path / "run")
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded(x), model(x))
    assert not sentinel.exists()
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="model.safetensors was altered"):
        fusion.load_model(tmp_path / "run")
