"""Raw VQA samples become training samples in the evaluation's exact prompt format."""

import io
import json

from PIL import Image

from fusion.config import load_config
from fusion.data.samples import SampleMaker, vqa_answer, vqa_prompt
from fusion.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def raw_vqa():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    meta = {"question": "What color is the square?", "answer": "red", "choices": ["red", "blue"],
            "type": "color"}
    return {"__key__": "k", "png": buf.getvalue(), "json": json.dumps(meta).encode()}


def test_vqa_loss_on_the_answer_only_by_default():
    for mode in ("answer", "all"):
        cfg = load_config(None, [f"data.vqa_loss={mode}", "model.vision.img_size=32",
                                 "model.vision.patch_size=8"])
        s = SampleMaker(cfg, TOK)(raw_vqa())
        text = TOK.decode([t for t in s["tokens"] if t < 256])
        assert text == vqa_prompt("What color is the square?") + vqa_answer("red")
        trained = TOK.decode([t for t, m in zip(s["tokens"], s["loss_mask"]) if m and t < 256])
        if mode == "answer":
            assert trained == vqa_answer("red") and s["loss_mask"][-1]  # eos too
        else:
            assert trained == text
        assert len(s["images"]) == 1 and s["images"][0].shape == (3, 32, 32)


def test_video_without_metadata_in_its_json_is_probed():
    """A vqa `.json` (SPEC §4) holds no fps / n_frames / size: the video itself says them; a video
    that does not open is counted as such, not as a bad json."""
    from tests.conftest import encode_mp4, square_frame

    cfg = load_config(None, ["data.n_frames=2", "model.vision.img_size=32", "model.vision.patch_size=8"])
    reasons = []
    maker = SampleMaker(cfg, TOK, counter=reasons.append)
    meta = json.dumps({"question": "Which way?", "answer": "left", "choices": ["left", "right"]}).encode()
    frames = [square_frame("red", 20 - 4 * i, 8) for i in range(5)]
    s = maker({"__key__": "v", "mp4": encode_mp4(frames), "json": meta})
    assert s is not None and s["modality"] == 2 and s["videos"][0].shape == (2, 3, 32, 32)
    assert maker({"__key__": "w", "mp4": b"not a video", "json": meta}) is None
    assert reasons == ["video_unreadable"]
