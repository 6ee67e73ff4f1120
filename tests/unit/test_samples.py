"""Raw VQA samples become training samples in the evaluation's exact prompt format."""

import io
import json

from PIL import Image

from fusion.config import load_config
from fusion.data.samples import SampleMaker, vqa_answer, vqa_prompt
from fusion.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def raw_vqa(**extra):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    meta = {
        "question": "What color is the square?",
        "answer": "red",
        "choices": ["red", "blue"],
        "type": "color",
        **extra,
    }
    return {"__key__": "k", "png": buf.getvalue(), "json": json.dumps(meta).encode()}


def test_vqa_loss_on_the_answer_only_by_default():
    for mode in ("answer", "all"):
        cfg = load_config(
            None, [f"data.vqa_loss={mode}", "model.vision.img_size=32", "model.vision.patch_size=8"]
        )
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
    """A vqa `.json` (docs/shards.md) holds no fps / n_frames / size: the video itself says them; a video
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


def test_a_conversation_trains_every_answer():
    """A record with `turns` becomes one sample: the image once, then every question and answer
    in order, in the evaluation's prompt format, each answer closed by eos (as a test answer is
    scored), the loss on each answer and its eos."""
    turns = [
        {"question": "What color is the square?", "answer": "red", "choices": ["red", "blue"]},
        {"question": "How many?", "answer": 2, "type": "count"},
        {"question": "Is it big?", "answer": "no"},
    ]
    cfg = load_config(None, ["model.vision.img_size=32", "model.vision.patch_size=8"])
    s = SampleMaker(cfg, TOK)(raw_vqa(turns=turns))
    text = TOK.decode([t for t in s["tokens"] if t < 256])
    assert text == "".join(vqa_prompt(t["question"]) + vqa_answer(str(t["answer"])) for t in turns)
    trained = TOK.decode([t for t, m in zip(s["tokens"], s["loss_mask"]) if m and t < 256])
    assert trained == vqa_answer("red") + vqa_answer("2") + vqa_answer("no")
    assert s["tokens"][-1] == TOK.eos_id and s["loss_mask"][-1] and len(s["images"]) == 1
    eos = [i for i, t in enumerate(s["tokens"]) if t == TOK.eos_id]
    assert len(eos) == 3 and all(s["loss_mask"][i] for i in eos) and s["min_pairs"] == 2 + 16 + 1
    assert TOK.decode(s["tokens"][eos[0] + 1 : eos[1]]) == vqa_prompt("How many?") + vqa_answer("2")
    # one turn is exactly the one-question record
    one = SampleMaker(cfg, TOK)(raw_vqa(turns=turns[:1]))
    plain = SampleMaker(cfg, TOK)(raw_vqa())
    assert one["tokens"] == plain["tokens"] and one["loss_mask"] == plain["loss_mask"]
    reasons = []
    maker = SampleMaker(cfg, TOK, counter=reasons.append)
    for bad in ([], "x", [{"question": "Q?"}], [{"answer": "a"}], [{"question": "Q?", "answer": [1]}]):
        assert maker(raw_vqa(turns=bad)) is None
    assert reasons == ["bad_turns"] * 5


def test_the_question_can_come_before_the_media():
    """`data.question=before`: bos, " Q: {question}", the media, " A:", the answer, eos; the loss on
    the answer and eos (and on the question's and the cue's words with `data.vqa_loss=all`), every
    media token an input. Later turns of a conversation follow as usual."""
    from fusion.data.samples import ANSWER_CUE, vqa_question

    turns = [
        {"question": "What color is the square?", "answer": "red"},
        {"question": "How many?", "answer": 2},
    ]
    for mode in ("answer", "all"):
        cfg = load_config(
            None,
            [
                "data.question=before",
                f"data.vqa_loss={mode}",
                "model.vision.img_size=32",
                "model.vision.patch_size=8",
            ],
        )
        s = SampleMaker(cfg, TOK)(raw_vqa(turns=turns))
        q = TOK.encode(vqa_question("What color is the square?"))
        image = [t for t in s["tokens"] if t >= 256 and t not in (TOK.bos_id, TOK.eos_id)]
        assert len(image) == 16 + 2  # placeholders and the image's start and end markers
        assert s["tokens"][: 1 + len(q)] == [TOK.bos_id] + q
        assert s["tokens"][1 + len(q) : 1 + len(q) + len(image)] == image
        assert s["min_pairs"] == 1 + len(q) + len(image)
        rest = s["tokens"][s["min_pairs"] :]
        second = TOK.encode(vqa_prompt("How many?") + vqa_answer("2"))
        assert rest == TOK.encode(ANSWER_CUE + vqa_answer("red")) + [TOK.eos_id] + second + [TOK.eos_id]
        trained = TOK.decode([t for t, m in zip(s["tokens"], s["loss_mask"]) if m and t < 256])
        if mode == "answer":
            assert trained == vqa_answer("red") + vqa_answer("2")
        else:
            assert trained == vqa_question("What color is the square?") + ANSWER_CUE + vqa_answer(
                "red"
            ) + vqa_prompt("How many?") + vqa_answer("2")
        assert not any(m for t, m in zip(s["tokens"], s["loss_mask"]) if t in image)
        assert s["loss_mask"][-1] and not s["loss_mask"][0]
