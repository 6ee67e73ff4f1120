"""Video decoding: decord and PyAV return the same, right frames; failures carry a reason.
Encoding: deterministic H.264; the builders' strict reading."""

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion.data import video
from fusion.data.sampling import VideoMeta
from fusion.data.video import DecodeStats, VideoDecodeError, decode, probe
from fusion.data.video_encode import rgb_to_yuv420p

try:  # tests/unit as a package, or on sys.path (pytest rootdir)
    from . import videos
except ImportError:
    import videos

pytest.importorskip("av")
pytest.importorskip("decord")

BACKENDS = ("decord", "pyav", "auto")


@pytest.fixture(scope="module")
def clip():
    return videos.encode_video(n_frames=20, height=32, width=40, fps=10, gop=4)


@pytest.fixture(scope="module")
def clip_faststart():
    """Index first, keyframes every 7 frames: sparse reads cross GOP boundaries unevenly."""
    return videos.encode_video(n_frames=23, height=48, width=32, fps=25, gop=7, faststart=True)


def check_frames(frames, ids, height, width):
    assert frames.dtype == np.uint8 and frames.shape == (len(ids), height, width, 3)
    assert videos.frame_ids(frames) == ids
    for f, i in zip(frames.astype(int), ids):  # pixel values survive the codec,
        want = videos.make_frame(i, height, width)  # away from the red block's edges
        assert np.abs(f[12:] - want[12:]).max() <= 6  # (4:2:0 chroma blurs them)
        assert np.abs(f[2:6, 2:6] - want[2:6, 2:6]).max() <= 6  # RGB order, not BGR


def test_import_loads_neither_backend():
    code = (
        "import sys, fusion.data.video, fusion.data.sampling; "
        "assert 'decord' not in sys.modules and 'av' not in sys.modules, sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_returns_the_requested_frames_in_order(backend, clip):
    indices = [19, 0, 5, 5, 3, 12, 0]  # unsorted, duplicates
    check_frames(decode(clip, indices, backend=backend), indices, 32, 40)
    check_frames(decode(clip, [7], backend=backend), [7], 32, 40)
    check_frames(decode(clip, list(range(20)), backend=backend), list(range(20)), 32, 40)
    # past the decoded count: clamped to the last frame
    check_frames(decode(clip, [18, 25, 400], backend=backend), [18, 19, 19], 32, 40)


def test_decord_and_pyav_agree_on_random_sparse_indices(clip, clip_faststart):
    for data, n, (h, w) in ((clip, 20, (32, 40)), (clip_faststart, 23, (48, 32))):
        for seed in range(12):
            rng = np.random.default_rng(seed)
            indices = rng.integers(0, n, int(rng.integers(1, 12))).tolist()
            if seed % 2:
                indices.sort()
            a = decode(data, indices, backend="decord")
            b = decode(data, indices, backend="pyav")
            assert a.shape == b.shape == (len(indices), h, w, 3)
            assert np.abs(a.astype(int) - b).max() <= 2, (seed, indices)
            assert videos.frame_ids(a) == indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe(backend, clip, clip_faststart):
    stats = DecodeStats()
    assert probe(clip, backend=backend, stats=stats) == VideoMeta(20, 10.0, 2.0, 40, 32)
    assert probe(clip_faststart, backend=backend, stats=stats) == VideoMeta(23, 25.0, 0.92, 32, 48)
    assert stats.decoded == 2 and stats.fallbacks == 0


def test_resize(clip):
    for backend in BACKENDS:
        frames = decode(clip, [2, 9], backend=backend, size=(16, 24))
        assert frames.shape == (2, 16, 24, 3) and frames.dtype == np.uint8
        assert videos.frame_ids(frames) == [2, 9]
    with pytest.raises(ValueError, match="size"):
        decode(clip, [0], size=(0, 8))


def zero_frame_avi():
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # header with a video stream, then no frames
    return buf.getvalue()


def broken_inputs(clip, clip_faststart):
    """name -> (bytes, {backend: expected reasons})."""
    mid = len(clip_faststart) * 3 // 4
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    either = {"unreadable", "corrupt"}
    return {
        "empty": (b"", dict.fromkeys(BACKENDS, {"empty"})),
        "garbage": (garbage, dict.fromkeys(BACKENDS, {"unreadable"})),
        # moov (the index) is written last: cutting the file loses it
        "truncated_index": (clip[: len(clip) // 2], dict.fromkeys(BACKENDS, {"unreadable"})),
        # moov first, media data cut: PyAV opens it and fails while decoding
        "truncated_media": (
            clip_faststart[:mid],
            {"decord": either, "pyav": {"corrupt"}, "auto": {"corrupt"}},
        ),
        "audio_only": (videos.encode_audio_only(), dict.fromkeys(BACKENDS, {"no_video_stream"})),
        "zero_frames": (
            zero_frame_avi(),
            {"decord": either | {"zero_frames"}, "pyav": {"zero_frames"}, "auto": {"zero_frames"}},
        ),
    }


def test_broken_inputs_raise_with_a_reason(clip, clip_faststart):
    for name, (data, expected) in broken_inputs(clip, clip_faststart).items():
        for backend in BACKENDS:
            for op in ("decode", "probe"):
                stats = DecodeStats()
                with pytest.raises(VideoDecodeError) as info:
                    if op == "decode":
                        decode(data, list(range(23)), backend=backend, stats=stats)
                    else:
                        probe(data, backend=backend, stats=stats)
                where = (name, backend, op, str(info.value))
                assert info.value.reason in expected[backend], where
                assert stats.failures == {info.value.reason: 1} and stats.decoded == 0, where
                if backend == "auto" and name != "empty":
                    assert stats.fallbacks == 1, where


def test_pyav_stops_after_the_last_wanted_frame(clip_faststart):
    damaged_tail = clip_faststart[: len(clip_faststart) * 3 // 4]
    check_frames(decode(damaged_tail, [10, 0, 1], backend="pyav"), [10, 0, 1], 48, 32)
    with pytest.raises(VideoDecodeError) as info:
        decode(damaged_tail, [0, 22], backend="pyav")
    assert info.value.reason == "corrupt"


def test_auto_falls_back_to_pyav_when_decord_fails(clip, monkeypatch):
    def broken(data, indices):
        raise VideoDecodeError("corrupt", "simulated decord failure", "decord")

    monkeypatch.setattr(video, "_decord_decode", broken)
    with pytest.raises(VideoDecodeError, match="simulated"):
        decode(clip, [1], backend="decord")
    stats = DecodeStats()
    indices = [3, 3, 17, 0]
    frames = decode(clip, indices, backend="auto", stats=stats)
    check_frames(frames, indices, 32, 40)
    assert np.array_equal(frames, decode(clip, indices, backend="pyav"))
    assert stats.fallbacks == 1 and stats.fallback_reasons == {"corrupt": 1}
    assert stats.decoded == 1 and not stats.failures
    assert stats.as_dict() == {"decoded": 1, "fallbacks": 1, "fallback/corrupt": 1}


def test_auto_falls_back_on_unexpected_decord_exceptions(clip, monkeypatch):
    def broken(data):
        raise MemoryError("simulated")

    monkeypatch.setattr(video, "_decord_probe", broken)
    stats = DecodeStats()
    assert probe(clip, stats=stats).n_frames == 20
    assert stats.fallback_reasons == {"MemoryError": 1}


def test_timeout_abandons_a_hung_decord_and_auto_falls_back(clip, monkeypatch):
    def hung(data, indices):
        time.sleep(1.5)
        raise AssertionError("the caller should have stopped waiting")

    monkeypatch.setattr(video, "_decord_decode", hung)
    stats = DecodeStats()
    start = time.perf_counter()
    with pytest.raises(VideoDecodeError) as info:
        decode(clip, [0], backend="decord", timeout=0.2, stats=stats)
    assert info.value.reason == "timeout" and time.perf_counter() - start < 1.0
    assert stats.failures == {"timeout": 1}
    frames = decode(clip, [4, 8], backend="auto", timeout=0.5, stats=stats)
    check_frames(frames, [4, 8], 32, 40)
    assert stats.fallback_reasons == {"timeout": 1} and stats.decoded == 1


def test_timeout_path_returns_results_and_errors(clip):
    check_frames(decode(clip, [6, 1], backend="decord", timeout=30.0), [6, 1], 32, 40)
    with pytest.raises(VideoDecodeError) as info:
        decode(b"not a video at all", [0], backend="pyav", timeout=30.0)
    assert info.value.reason == "unreadable"


def test_auto_survives_decords_width_48_bug():
    # decord 0.6.0 fails get_batch for widths 16, 24, 48, 72 (row padding read as a 4th
    # channel); auto must still return the right frames
    data = videos.encode_video(n_frames=6, height=32, width=48)
    stats = DecodeStats()
    check_frames(decode(data, [5, 1], stats=stats), [5, 1], 32, 48)
    assert stats.decoded == 1


def test_missing_backend(clip, monkeypatch):
    monkeypatch.setattr(video, "_installed", lambda module: module != "decord")
    with pytest.raises(ImportError, match="decord"):
        decode(clip, [0], backend="decord")
    stats = DecodeStats()
    check_frames(decode(clip, [2], backend="auto", stats=stats), [2], 32, 40)
    assert stats.fallbacks == 0  # PyAV chosen, not fallen back to
    monkeypatch.setattr(video, "_installed", lambda module: False)
    with pytest.raises(ImportError, match="neither"):
        decode(clip, [0], backend="auto")


def test_bad_arguments(clip):
    with pytest.raises(ValueError, match="backend"):
        decode(clip, [0], backend="ffmpeg")
    with pytest.raises(ValueError, match="no frame indices"):
        decode(clip, [])
    with pytest.raises(ValueError, match="negative"):
        decode(clip, [-1])


# ---------------------------------------------------------------- encoding, strict reading


def test_encode_frames_round_trips_deterministically():
    frames = np.stack([videos.make_frame(i, 32, 40) for i in range(6)])  # (6, 32, 40, 3)
    data = video.encode_frames(frames, 10, crf=0, keyframe_interval=4)
    assert data == video.encode_frames(frames, 10, crf=0, keyframe_interval=4)
    check_frames(decode(data, [5, 0, 3], backend="pyav"), [5, 0, 3], 32, 40)
    meta = video.measure(data)
    assert (meta.n_frames, meta.fps, meta.width, meta.height) == (6, 10.0, 40, 32)
    # x264 writes its settings into the stream: scene-cut keyframes off unless asked for
    assert b"scenecut=0" in data
    assert b"scenecut=40" in video.encode_frames(frames, 10, crf=0, keyframe_interval=4, scene_cuts=True)


def test_the_same_frames_encode_to_the_same_bytes_every_time():
    """x264's default macroblock tree made 35 of 20,000 encodes differ within one process, which
    broke byte-identical resumes; fusion turns it off. 3000 encodes of one clip, with the heap
    stirred between them, must all give the same bytes (with the tree on, about 99% of such
    checks see a second output)."""
    r = subprocess.run(
        [sys.executable, "tools/check_encoder_determinism.py", "--runs", "3000"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 distinct outputs in 3000 encodes" in r.stdout
    frames = np.stack([videos.make_frame(i, 32, 40) for i in range(6)])
    assert b"mbtree=0" in video.encode_frames(frames, 10, crf=23, keyframe_interval=4)  # x264's SEI


def test_rgb_to_yuv420p_is_bt601_studio_range_with_2x2_chroma():
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    frames[0] = (255, 255, 255)
    frames[1, :, :2] = (255, 0, 0)  # the first 2x2 chroma blocks are red
    frames[1, :2, 2:4] = (0, 0, 255)  # one blue block
    frames[1, 2:, 2:4] = [[(0, 0, 255), (0, 0, 0)], [(0, 0, 0), (0, 0, 255)]]  # half blue
    yuv = rgb_to_yuv420p(frames)
    assert yuv.shape == (2, 6, 6) and yuv.dtype == np.uint8
    luma, cb, cr = yuv[:, :4], yuv[:, 4:5].reshape(2, 2, 3), yuv[:, 5:6].reshape(2, 2, 3)
    assert (luma[0] == 235).all() and (cb[0] == 128).all() and (cr[0] == 128).all()
    assert luma[1, 0, 0] == 81 and luma[1, 0, 4] == 16 and luma[1, 0, 2] == 41  # red, black, blue
    assert (cb[1, :, 0] == 90).all() and (cr[1, :, 0] == 240).all()  # red
    assert cb[1, 0, 1] == 240 and cr[1, 0, 1] == 110  # blue
    assert cb[1, 1, 1] == 184 and cr[1, 1, 1] == 119  # the mean of blue and black
    # half a frame's height odd (6 rows: 3 chroma rows of 2): the planes follow each other in memory
    flat = rgb_to_yuv420p(np.full((1, 6, 4, 3), 255, np.uint8)).reshape(-1)
    assert flat.size == 36 and (flat[:24] == 235).all() and (flat[24:] == 128).all()
    with pytest.raises(ValueError, match="even frame sides, got 5x4"):
        rgb_to_yuv420p(np.zeros((1, 4, 5, 3), np.uint8))


def test_encoded_colours_come_back_from_both_decoders():
    """Flat colours through our yuv420p conversion and x264 (lossless quantiser) come back
    within a few levels from decord and PyAV: the conversion and the decoders agree on BT.601."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    for k in range(8):
        tiles = np.roll(palette, k, axis=0).reshape(4, 4, 3)
        frames[k] = tiles.repeat(8, axis=0).repeat(8, axis=1)  # 8x8 px tiles, moving
    data = video.encode_frames(frames, 8, crf=0, keyframe_interval=4, scene_cuts=True)
    for backend in ("pyav", "decord"):
        got = decode(data, [0, 5, 7], backend=backend).astype(int)
        assert np.abs(got - frames[[0, 5, 7]].astype(int)).max() <= 4, backend


def test_transcode_retimes_and_resizes(clip):
    data = video.transcode(clip, fps=5, max_side=20, crf=0, keyframe_interval=3)
    assert data == video.transcode(clip, fps=5, max_side=20, crf=0, keyframe_interval=3)
    meta = video.measure(data)
    assert (meta.n_frames, meta.fps, meta.width, meta.height) == (10, 5.0, 20, 16)
    assert probe(data, backend="pyav") == meta
    assert "mp4" in video.container_format(data).split(",")
    assert video.encoded_size(24, 32, 0) == (22, 32)  # decord misreads width 24


def test_strict_reading_refuses_still_images_and_truncated_files(clip_faststart):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    for fn in (video.transcode, video.measure, video.container_format):
        with pytest.raises(VideoDecodeError) as info:
            fn(buf.getvalue())
        assert info.value.reason == "unsupported_format"
        assert info.value.message == "a still image (png_pipe), not a video"
        with pytest.raises(VideoDecodeError) as info:
            fn(b"")
        assert info.value.reason == "empty"
    index_only = clip_faststart[: clip_faststart.index(b"mdat") + 4]  # no media data at all
    for fn in (video.transcode, video.measure):
        with pytest.raises(VideoDecodeError, match="truncated") as info:
            fn(index_only)
        assert info.value.reason == "corrupt"


def test_backend_and_encoder_available(monkeypatch):
    assert video.backend_available("pyav") and video.backend_available("decord")
    assert video.encoder_available("libx264") and not video.encoder_available("no-such-codec")
    with pytest.raises(ValueError, match="backend"):
        video.backend_available("auto")
    monkeypatch.setattr(video, "_installed", lambda module: False)
    assert not video.backend_available("pyav") and not video.encoder_available()
