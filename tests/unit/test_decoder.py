import torch

from fusion.config import load_config
from fusion.data.sequence import Packer, collate
from fusion.data.tokenizer import ByteTokenizer
from fusion.model.decoder import apply_rotary, document_mask
from fusion.model.fusion import build_model

VOCAB = ByteTokenizer().vocab_size


def tiny(*overrides):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.size=debug", *overrides])
    return cfg, build_model(cfg.model, ByteTokenizer())


def test_input_ids_alone_give_logits():
    _, model = tiny()
    x = torch.randint(0, 256, (2, 12))  # plain bytes: no placeholder tokens
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 12, VOCAB)


def test_document_mask_is_block_diagonal_causal():
    m = document_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_packed_documents_cannot_see_each_other():
    _, model = tiny("model.moe.path=loop")
    model.eval()
    p = Packer(seq_len=16, pad_id=0)
    p.add(list(range(1, 8)))  # doc 0: 6 positions
    p.add(list(range(20, 31)))  # doc 1: 10 positions
    b = collate(p.ready)
    logits = model(b["input_ids"], positions=b["positions"], doc_ids=b["doc_ids"])
    perturbed = b["input_ids"].clone()
    perturbed[0, :6] = torch.randint(100, 200, (6,))  # plain bytes, no placeholders
    logits2 = model(perturbed, positions=b["positions"], doc_ids=b["doc_ids"])
    assert torch.allclose(logits[0, 6:], logits2[0, 6:], atol=1e-5)  # doc 1 unchanged
    assert not torch.allclose(logits[0, :6], logits2[0, :6])  # doc 0 did change
    # and doc 1 alone, at positions 0.., gives the same logits as inside the packed row
    alone = model(b["input_ids"][:, 6:])
    assert torch.allclose(alone[0], logits[0, 6:], atol=1e-5)


def test_rotary_is_a_rotation_and_relative():
    x = torch.randn(1, 2, 5, 8)
    pos = torch.arange(5)[None]
    from fusion.model.decoder import Rotary

    rot = Rotary(8, 10000.0)
    cos, sin = rot(pos)
    y = apply_rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # q.k depends only on the distance: shift both positions by 3
    cos3, sin3 = rot(pos + 3)
    q, k = x[:, :1], x[:, 1:]
    d0 = (apply_rotary(q, cos, sin)[..., 4, :] * apply_rotary(k, cos, sin)[..., 1, :]).sum()
    d3 = (apply_rotary(q, cos3, sin3)[..., 4, :] * apply_rotary(k, cos3, sin3)[..., 1, :]).sum()
    assert torch.allclose(d0, d3, atol=1e-4)


def test_moe_interleave_and_loss_parts():
    cfg, model = tiny("model.n_layers=4", "model.moe.every=2", "model.moe.balance=aux")
    kinds = ["moe" if b.moe is not None else "dense" for b in model.decoder.layers]
    assert kinds == ["dense", "moe", "dense", "moe"]
    p = Packer(seq_len=16, pad_id=0)
    p.add(list(range(1, 40)))
    b = collate(p.ready)
    out = model(b["input_ids"], labels=b["labels"], positions=b["positions"], doc_ids=b["doc_ids"])
    expected = out.lm_loss + cfg.model.moe.aux_coef * out.aux_loss + cfg.model.moe.z_coef * out.z_loss
    assert torch.allclose(out.loss, expected)
    assert out.aux_loss > 0 and out.z_loss > 0
    assert out.loss_count[0] == (b["labels"] != -100).sum() and out.loss_count[1:].sum() == 0


def test_padding_gets_no_loss_and_no_router_counts():
    _, model = tiny()
    model.train()
    p = Packer(seq_len=16, pad_id=0)
    p.add(list(range(1, 6)))
    p.flush()  # 4 real positions, 12 padding
    b = collate(p.ready)
    out = model(b["input_ids"], labels=b["labels"], positions=b["positions"], doc_ids=b["doc_ids"])
    assert out.loss_count.sum() == 4
    for layer in model.moe_layers:
        assert layer.take_load().sum() == 4 * layer.cfg.top_k
