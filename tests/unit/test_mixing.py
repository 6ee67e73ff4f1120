"""The loader: rank/worker splits, the modality plan, exact resume, media samples."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusion.config import ConfigError, load_config
from fusion.data.mixing import build_batches, dataset_sizes, plan_next, target_shares
from fusion.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def cfg_for(seq_len=160, **data):
    over = [f"data.{k}={v}" for k, v in data.items()]
    return load_config(
        None,
        [
            f"train.seq_len={seq_len}",
            "train.micro_batch=2",
            "data.shuffle_buffer=8",
            "data.num_workers=0",
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "data.n_frames=4",
            *over,
        ],
    )


def test_plan_is_deterministic_and_converges_to_target():
    probs = {"text": 0.5, "image": 0.3, "video": 0.2}
    rows = {m: 0 for m in probs}
    plan = []
    for _ in range(1000):
        m = plan_next(probs, rows)
        rows[m] += 1
        plan.append(m)
    for m, p in probs.items():
        assert abs(rows[m] / 1000 - p) < 0.002
    # smooth: every window of 10 rows holds each modality about its share
    for start in range(0, 990, 10):
        window = plan[start : start + 10]
        assert abs(window.count("text") - 5) <= 1


def test_target_shares_temperature(text_shards, image_shards):
    specs = {"text": str(text_shards), "image": str(image_shards)}
    w = {"text": 1.0, "image": 1.0, "video": 1.0}
    assert target_shares(specs, w, 0.0) == {"text": 0.5, "image": 0.5}
    p = target_shares(specs, w, 1.0)  # 400 vs 60 samples
    assert p["text"] == pytest.approx(400 / 460)


def test_alpha_counts_samples_for_lists_patterns_and_copied_shards(text_shards, image_shards, tmp_path):
    """data.alpha sizes are samples however the shards are named, and never samples for one
    modality against shards for another."""
    import shutil

    shards = sorted(p.name for p in image_shards.glob("*.tar"))
    assert len(shards) >= 2
    listed = ",".join(f"{image_shards}/{n}" for n in shards)  # a list of shard files
    both = f"{image_shards},{image_shards}"  # a list of directories
    assert dataset_sizes({"text": str(text_shards), "image": listed}) == (
        {"text": 400, "image": 60},
        "samples",
    )
    assert dataset_sizes({"image": both})[0] == {"image": 120}
    # shards copied without index.json: counts from their *_stats.json; one without either is
    # estimated from the others
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in image_shards.iterdir():
        if p.name != "index.json":
            shutil.copy(p, copy / p.name)
    assert dataset_sizes({"image": str(copy)})[0] == {"image": 60}
    stats = sorted(copy.glob("*_stats.json"))
    stats[0].unlink()
    assert dataset_sizes({"image": str(copy)})[0]["image"] == pytest.approx(60, abs=60 / len(shards))
    for p in stats[1:]:
        p.unlink()
    assert dataset_sizes({"text": str(text_shards), "image": str(copy)}) == (
        {"text": len(list(text_shards.glob("*.tar"))), "image": len(shards)},
        "shards",
    )


def keys_of(cfg, rank, world, n_batches, workers):
    cfg.data.num_workers = workers
    b = build_batches(cfg, TOK, rank, world)
    for _ in range(n_batches):
        next(b)
    return b.take_keys()


def test_two_ranks_two_workers_see_disjoint_samples(text_shards):
    cfg = cfg_for(text=text_shards)
    cfg.train.seq_len = 16  # short rows: every sample starts in its own few rows
    seen = [keys_of(cfg, r, 2, 40, workers=2) for r in range(2)]
    assert len(seen[0]) > 20 and len(seen[1]) > 20
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == len(seen[0])  # no repeats within an epoch's worth


def test_fewer_shards_than_substreams_starves_nobody(image_shards):
    cfg = cfg_for(image=image_shards)  # 3 shards, 2 ranks x 2 workers = 4 sub-streams
    seen = [keys_of(cfg, r, 2, 3, workers=2) for r in range(2)]
    assert all(seen) and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_same_batches(text_shards, image_shards, video_shards, workers):
    cfg = cfg_for(text=text_shards, image=image_shards, video=video_shards)
    cfg.data.num_workers = workers
    a = build_batches(cfg, TOK, 0, 1)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(6)]
    b = build_batches(cfg, TOK, 0, 1)
    b.load_state_dict(state)
    got = [next(b) for _ in range(6)]
    for x, y in zip(expected, got):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_media_batches_match_placeholders(image_shards, video_shards):
    cfg = cfg_for(image=image_shards, video=video_shards)
    b = build_batches(cfg, TOK, 0, 1)
    for batch in itertools.islice(b, 6):
        ids = batch["input_ids"]
        n_patch = int((ids == TOK.patch_id).sum())
        n_img = len(batch.get("images", []))
        n_vid = len(batch.get("videos", []))
        assert n_patch == n_img * 16 + n_vid * 4 * 16
        assert int((ids == TOK.image_start_id).sum()) == n_img
        assert int((ids == TOK.video_start_id).sum()) == n_vid
        assert (batch["labels"][ids == TOK.patch_id] == -100).all()
        if n_vid:
            assert batch["videos"].shape[1:] == (4, 3, 32, 32) and batch["videos"].dtype == torch.uint8
    assert b.shares().keys() == {"image", "video"}
    assert b.rows["image"] == b.rows["video"] == 6


def test_media_that_cannot_fit_is_rejected_up_front(video_shards):
    with pytest.raises(ConfigError, match="train.seq_len.*one video's 69 tokens"):
        cfg_for(seq_len=64, video=video_shards)


def test_a_stream_of_only_unusable_samples_fails_loudly(video_shards, monkeypatch):
    from fusion.data.mixing import ModalityRows

    monkeypatch.setattr(ModalityRows, "MAX_FAILURES_IN_A_ROW", 20)
    cfg = cfg_for(video=video_shards)
    cfg.train.seq_len = 40  # bypassing validation: every video is too long and dropped
    with pytest.raises(RuntimeError, match="unusable samples in a row"):
        next(build_batches(cfg, TOK, 0, 1))


def test_bad_samples_are_counted_not_fatal(tmp_path):
    from fusion.data.shards import write_index
    from fusion.data.tar import ShardWriter

    out = tmp_path / "bad"
    with ShardWriter(out, 0) as w:
        w.write("good", {"png": _png(), "txt": "ok"})
        w.write("broken", {"png": _png()[:60], "txt": "x"})  # truncated
        w.write("nocap", {"png": _png(), "txt": "   "})
    write_index(out, "image")
    cfg = cfg_for(image=out)
    b = build_batches(cfg, TOK, 0, 1)
    next(b)
    fails = b.failures()
    assert fails.get("bad_image", 0) >= 1 and fails.get("empty_caption", 0) >= 1


def _png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_shuffle_buffer_zero_reads_each_shard_in_order(text_shards):
    cfg = cfg_for(text=text_shards, shuffle_buffer=0)
    cfg.train.seq_len = 16
    keys = keys_of(cfg, 0, 1, 30, workers=0)
    assert len(keys) > 10 and len(set(keys)) == len(keys)
    # without a buffer, samples of a shard come in the shard's order (shards are still shuffled)
    runs = sum(1 for a, b in zip(keys, keys[1:]) if b < a)
    assert runs <= len(list(text_shards.glob("*.tar"))), keys
