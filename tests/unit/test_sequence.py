import torch

from fusion.data.sequence import Packer, collate
from fusion.data.tokenizer import ByteTokenizer, build_tokenizer
from fusion.schema import IGNORE, SPECIAL_TOKENS


def test_packer_rows_labels_positions():
    p = Packer(seq_len=8, pad_id=0)
    p.add([1, 2, 3, 4])  # 3 pairs
    p.add([10, 11, 12, 13, 14, 15, 16])  # 6 pairs: 5 fit, 1 spills to the next row
    assert len(p.ready) == 1
    row = p.ready[0]
    assert row["input_ids"] == [1, 2, 3, 10, 11, 12, 13, 14]
    assert row["labels"] == [2, 3, 4, 11, 12, 13, 14, 15]
    assert row["positions"] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert row["doc_ids"] == [0, 0, 0, 1, 1, 1, 1, 1]
    p.flush()
    row = p.ready[1]
    assert row["input_ids"][:1] == [15] and row["labels"][:1] == [16]
    assert row["labels"][1:] == [IGNORE] * 7 and row["doc_ids"][1:] == [-1] * 7


def test_packer_loss_mask_and_state_roundtrip():
    p = Packer(seq_len=6, pad_id=0)
    p.add([5, 6, 7, 8], modality=1, loss_mask=[True, False, True, True])
    state = p.state_dict()
    q = Packer(seq_len=6, pad_id=0)
    q.load_state_dict(state)
    for packer in (p, q):
        packer.add([1, 2, 3, 4])
    assert p.ready == q.ready
    row = p.ready[0]
    assert row["labels"][:3] == [IGNORE, 7, 8]
    assert row["sample_modality"][:3] == [1, 1, 1]


def test_collate_shapes():
    p = Packer(seq_len=4, pad_id=0)
    p.add(list(range(20)))
    b = collate(p.ready[:3])
    assert b["input_ids"].shape == (3, 4) and b["input_ids"].dtype == torch.long


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    text = "héllo wörld ✓"
    assert tok.decode(tok.encode(text)) == text
    ids = {
        tok.pad_id,
        tok.bos_id,
        tok.eos_id,
        tok.image_start_id,
        tok.image_end_id,
        tok.patch_id,
        tok.video_start_id,
        tok.video_end_id,
        tok.frame_sep_id,
    }
    assert len(ids) == len(SPECIAL_TOKENS) and min(ids) >= 256 and tok.vocab_size == 256 + len(ids)


def test_hf_tokenizer_from_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(
        ["the red circle", "a blue square moves left"] * 20,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]),
    )
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    tok = build_tokenizer(str(path))
    ids = tok.encode("the red square")
    assert tok.decode(ids).replace(" ", "") == "theredsquare"
    base = t.get_vocab_size()
    assert tok.vocab_size == base + len(SPECIAL_TOKENS) and max(ids) < base
    assert sorted(tok.special_ids.values()) == list(range(base, base + len(SPECIAL_TOKENS)))
