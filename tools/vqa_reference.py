"""A plain PyTorch toy-VQA model outside fusion, as a reference for how fast the toy world can be
learned: image-VQA rows only, 4 pre-LayerNorm layers of width 128, learned absolute positions, one
Linear per PATCH-px patch, byte-level text, batch 64, AdamW lr 1e-3, loss on the answer bytes;
accuracy by length-normalised choice likelihood on 300 test questions, beside grey-image (blind).

    python tools/vqa_reference.py PATCH STEPS THREADS      # README figure: 8 1500 2 (eval at 500)
"""

import glob
import io
import json
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
PATCH = int(sys.argv[1]) if len(sys.argv) > 1 else 8
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 1000


def load(d):
    out = []
    for t in sorted(glob.glob(f"{d}/*.tar")):
        tf = tarfile.open(t)
        m = {}
        for mem in tf.getmembers():
            k, ext = mem.name.split(".", 1)
            m.setdefault(k, {})[ext] = tf.extractfile(mem).read()
        for v in m.values():
            img = next(v[e] for e in ("png", "jpg") if e in v)
            out.append((np.array(Image.open(io.BytesIO(img)).convert("RGB")), json.loads(v["json"])))
    return out


train, test = load("data/toy/vqa_image_train"), load("data/toy/vqa_image_test")
print(len(train), len(test), flush=True)
BOS, SEP, EOS, PAD = 256, 257, 258, 259


def toks(s):
    return list(s.encode())


D, L, H = 128, 4, 4


class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.n1 = nn.LayerNorm(D)
        s.att = nn.MultiheadAttention(D, H, batch_first=True)
        s.n2 = nn.LayerNorm(D)
        s.ff = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(s, x, mask):
        h = s.n1(x)
        x = x + s.att(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + s.ff(s.n2(x))


NP = (32 // PATCH) ** 2


class M(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(260, D)
        s.pos = nn.Embedding(128, D)
        s.patch = nn.Linear(3 * PATCH * PATCH, D)
        s.blocks = nn.ModuleList(Block() for _ in range(L))
        s.norm = nn.LayerNorm(D)
        s.head = nn.Linear(D, 260)

    def forward(s, img, ids):
        g = 32 // PATCH
        x = img.float().div(255).sub(0.5).div(0.5).permute(0, 3, 1, 2)
        x = (
            x.unflatten(2, (g, PATCH))
            .unflatten(4, (g, PATCH))
            .permute(0, 2, 4, 1, 3, 5)
            .flatten(3)
            .flatten(1, 2)
        )
        h = torch.cat([s.patch(x), s.emb(ids)], 1)
        T = h.shape[1]
        h = h + s.pos(torch.arange(T))
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        for b in s.blocks:
            h = b(h, mask)
        return s.head(s.norm(h))


def batch(items, answers=None):
    seqs, lab = [], []
    for i, (_img, meta) in enumerate(items):
        a = answers[i] if answers else meta["answer"]
        q = [BOS] + toks(meta["question"]) + [SEP]
        ans = toks(a) + [EOS]
        seqs.append(q + ans)
        lab.append([-100] * len(q) + ans)
    T = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (T - len(s)) for s in seqs])
    lb = torch.tensor([l + [-100] * (T - len(l)) for l in lab])
    img = torch.tensor(np.stack([i for i, _ in items]))
    return img, ids, lb


m = M()
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
rng = np.random.default_rng(0)
BS = 64


def evaluate(n=300, blind=False):
    m.eval()
    correct = 0
    items = test[:n]
    with torch.no_grad():
        for img, meta in items:
            if blind:
                img = np.full_like(img, 128)
            ch = meta["choices"]
            im, ids, lb = batch([(img, meta)] * len(ch), ch)
            lp = F.log_softmax(m(im, ids)[:, NP:], -1)
            sc = [
                (lp[k, :-1].gather(-1, lb[k, 1:].clamp(min=0)[:, None])[:, 0] * (lb[k, 1:] != -100)).sum()
                / (lb[k, 1:] != -100).sum()
                for k in range(len(ch))
            ]
            correct += ch[int(torch.stack(sc).argmax())] == meta["answer"]
    m.train()
    return correct / len(items)


t0 = time.time()
for step in range(1, STEPS + 1):
    idx = rng.integers(0, len(train), BS)
    img, ids, lb = batch([train[i] for i in idx])
    logits = m(img, ids)[:, NP:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 260), lb[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(step, f"{loss.item():.3f}", f"{time.time() - t0:.0f}s", flush=True)
    if step % 500 == 0:
        print("acc", evaluate(), "blind", evaluate(blind=True), flush=True)
