"""Frame-index samplers: properties over many random videos and configs, plus worked examples."""

import math

import numpy as np
import pytest

from fusion.data.sampling import PAD_POLICIES, STRATEGIES, FrameSampling, VideoMeta, sample_frame_indices


def meta(n, fps=30.0, width=64, height=48):
    return VideoMeta(n_frames=n, fps=fps, duration=n / fps if fps else 0.0, width=width, height=height)


def expected_count(m: VideoMeta, cfg: FrameSampling) -> int:
    """The count a caller should get, derived from the documented rules (not the module's code)."""
    if cfg.strategy != "fps":
        return cfg.n_frames
    r = cfg.round_to
    lo, hi = math.ceil(cfg.min_frames / r) * r, (cfg.max_frames // r) * r
    seconds = m.n_frames / m.fps if m.fps > 0 else m.duration
    c = min(max(round(seconds * cfg.fps), lo), hi, m.n_frames)
    return max((c // r) * r, r)


def random_case(rng):
    small = rng.random() < 0.3
    n = int(rng.integers(1, 12) if small else rng.integers(1, 2000))
    fps = float(rng.choice([0.0, 1.0, 7.5, 24.0, 29.97, 30.0, 60.0]))
    m = VideoMeta(n_frames=n, fps=fps, duration=n / (fps or 25.0), width=32, height=32)
    r = int(rng.choice([1, 2, 4]))
    lo = int(rng.integers(1, 9))
    cfg = FrameSampling(
        strategy=str(rng.choice(STRATEGIES)),
        n_frames=r * int(rng.integers(1, 17)),
        fps=float(rng.choice([0.5, 1.0, 2.0, 4.0])),
        min_frames=lo,
        max_frames=lo + r * int(rng.integers(1, 16)),
        round_to=r,
        pad=str(rng.choice(PAD_POLICIES)),
    )
    return m, cfg


def test_properties_over_random_videos_and_configs():
    seen_random_differs = 0
    for seed in range(3000):
        case_rng = np.random.default_rng(seed)
        m, cfg = random_case(case_rng)
        idx = sample_frame_indices(m, cfg, np.random.default_rng(seed))
        n, count = m.n_frames, expected_count(m, cfg)
        where = f"seed={seed} meta={m} cfg={cfg} -> {idx}"

        assert all(type(i) is int for i in idx), where
        assert idx == sorted(idx), where
        assert all(0 <= i < n for i in idx), where
        if n >= count or cfg.pad != "none":
            assert len(idx) == count, where
            assert len(idx) % cfg.round_to == 0, where
        else:
            assert idx == list(range(n)), where
        if cfg.strategy == "fps":
            assert len(idx) <= max(cfg.max_frames, cfg.round_to), where
            assert len(idx) >= min(
                math.ceil(cfg.min_frames / cfg.round_to) * cfg.round_to, (n // cfg.round_to) * cfg.round_to
            ), where
        if n >= count:
            assert len(set(idx)) == count, where  # no repeats unless the video is short
        else:
            assert set(idx) == set(range(n)), where  # a short video uses every frame
        if cfg.strategy.startswith("segment") and n >= count:
            for k, i in enumerate(idx):  # exactly one index per equal segment
                assert math.floor(k * n / count) <= i < math.floor((k + 1) * n / count), where

        again = sample_frame_indices(m, cfg, np.random.default_rng(seed))
        assert again == idx, where  # deterministic per seed
        if cfg.strategy == "segment_random" and n >= 4 * count:
            other = sample_frame_indices(m, cfg, np.random.default_rng(seed + 10_000))
            seen_random_differs += other != idx
        elif cfg.strategy != "segment_random":
            assert sample_frame_indices(m, cfg, None) == idx, where  # rng unused
    assert seen_random_differs > 50


def test_uniform_spreads_over_the_clip_and_never_repeats_frame_zero():
    cfg = FrameSampling("uniform", n_frames=8)
    assert sample_frame_indices(meta(8), cfg) == list(range(8))
    assert sample_frame_indices(meta(15), cfg) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert sample_frame_indices(meta(100), cfg) == [0, 14, 28, 42, 57, 71, 85, 99]
    # Aria's int(len / 8) * i gives [0] * 8 for a 5-frame clip; here every frame is used
    assert sample_frame_indices(meta(5), cfg) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert sample_frame_indices(meta(9), cfg) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert sample_frame_indices(meta(101), FrameSampling("uniform", n_frames=1)) == [50]


def test_segment_middle_is_the_middle_of_each_segment():
    cfg = FrameSampling("segment_middle", n_frames=4)
    assert sample_frame_indices(meta(40), cfg) == [5, 15, 25, 35]
    assert sample_frame_indices(meta(4), cfg) == [0, 1, 2, 3]
    assert sample_frame_indices(meta(6), cfg) == [0, 2, 3, 5]  # segments [0] [1 2] [3] [4 5]


def test_segment_random_covers_every_frame_of_each_segment():
    cfg = FrameSampling("segment_random", n_frames=4)
    rng = np.random.default_rng(0)
    hits = np.zeros(18, int)
    for _ in range(2000):
        for i in sample_frame_indices(meta(18), cfg, rng):
            hits[i] += 1
    assert (hits > 0).all(), hits  # no frame of any segment is unreachable
    # segments of 18 frames in 4: [0, 4) [4, 9) [9, 13) [13, 18): each gets one draw per call
    assert [hits[0:4].sum(), hits[4:9].sum(), hits[9:13].sum(), hits[13:18].sum()] == [2000] * 4


def test_segment_random_needs_an_rng():
    with pytest.raises(ValueError, match="rng"):
        sample_frame_indices(meta(100), FrameSampling("segment_random"), None)


def test_fps_count_follows_clip_length_caps_and_rounding():
    cfg = FrameSampling("fps", fps=2.0, min_frames=4, max_frames=32)
    ten_s = sample_frame_indices(meta(300, fps=30.0), cfg)
    assert ten_s == [15 * k + 7 for k in range(20)]  # 2 fps over 10 s: one frame every 0.5 s
    assert len(sample_frame_indices(meta(1800, fps=30.0), cfg)) == 32  # 60 s: capped
    assert len(sample_frame_indices(meta(30, fps=30.0), cfg)) == 4  # 1 s: min_frames
    assert sample_frame_indices(meta(3, fps=30.0), cfg) == [0, 1, 2]  # fewer decoded frames
    odd = FrameSampling("fps", fps=1.0, min_frames=3, max_frames=31, round_to=2)
    assert len(sample_frame_indices(meta(210, fps=30.0), odd)) == 6  # 7 s -> 7 -> 6
    assert len(sample_frame_indices(meta(3000, fps=30.0), odd)) == 30  # cap 31 -> 30
    assert len(sample_frame_indices(meta(30, fps=30.0), odd)) == 4  # min 3 -> 4
    assert sample_frame_indices(meta(3, fps=30.0), odd) == [0, 2]  # 3 decoded -> 2
    assert sample_frame_indices(meta(1, fps=30.0), odd) == [0, 0]  # padded to round_to
    # unknown fps: the container duration gives the clip length
    no_fps = VideoMeta(n_frames=250, fps=0.0, duration=5.0, width=8, height=8)
    assert len(sample_frame_indices(no_fps, cfg)) == 10
    with pytest.raises(ValueError, match="clip length"):
        sample_frame_indices(VideoMeta(10, 0.0, 0.0, 8, 8), cfg)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_short_video_pad_policies(strategy):
    m = meta(5)
    kw = dict(strategy=strategy, n_frames=8, min_frames=8, max_frames=8)
    rng = np.random.default_rng(0)
    if strategy == "fps":  # the fps count is clamped to the decoded count: no padding
        assert sample_frame_indices(m, FrameSampling(**kw), rng) == [0, 1, 2, 3, 4]
        return
    assert sample_frame_indices(m, FrameSampling(**kw, pad="repeat_last"), rng) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert sample_frame_indices(m, FrameSampling(**kw, pad="loop"), rng) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert sample_frame_indices(m, FrameSampling(**kw, pad="none"), rng) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(meta(1), FrameSampling(**kw, pad="loop"), rng) == [0] * 8


def test_zero_frames_raises():
    for strategy in STRATEGIES:
        with pytest.raises(ValueError, match="0 decoded frames"):
            sample_frame_indices(meta(0), FrameSampling(strategy), np.random.default_rng(0))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(strategy="random"), "strategy"),
        (dict(pad="zeros"), "pad"),
        (dict(n_frames=0), "n_frames"),
        (dict(n_frames=7, round_to=2), "multiple of round_to"),
        (dict(strategy="fps", fps=0.0), "fps"),
        (dict(strategy="fps", min_frames=5, max_frames=5, round_to=2), "min_frames"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        FrameSampling(**kw)


def test_video_meta_from_json():
    d = {"n_frames": 20, "fps": 10.0, "duration": 2.0, "width": 40, "height": 32}
    m = VideoMeta.from_json(d)
    assert m == VideoMeta(20, 10.0, 2.0, 40, 32) and m.to_json() == d
    assert VideoMeta.from_json({**d, "n_frames": 20.0}).n_frames == 20
    for missing in d:
        with pytest.raises(ValueError, match=f"missing field.*'{missing}'"):
            VideoMeta.from_json({k: v for k, v in d.items() if k != missing})
    with pytest.raises(ValueError, match="n_frames"):
        VideoMeta.from_json({**d, "n_frames": "20"})
    with pytest.raises(ValueError, match="width"):
        VideoMeta.from_json({**d, "width": -1})
    with pytest.raises(ValueError, match="fps"):
        VideoMeta.from_json({**d, "fps": float("nan")})
    with pytest.raises(ValueError, match="dict"):
        VideoMeta.from_json([20, 10.0])
