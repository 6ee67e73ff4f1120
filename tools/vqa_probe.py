"""Toy-VQA learning probe: the fusion model and loader in ONE process (no DeepSpeed), plain AdamW
with linear warmup and no decay, evaluated with fusion-eval's scorer on 300 test questions, for
studying what makes the demo learn without paying for a 2-rank run each time.

    python tools/vqa_probe.py STEPS [key=value overrides of configs/demo.yaml ...]
    env: TEST (VQA test dir, default data/toy/vqa_image_test), EVERY (eval interval, default 250),
         LOGE (log interval, default 50)

Image questions and captions only, the demo's model, one row of 256 tokens = ~7 samples:

    A="data.text= data.video= data.weights=[0,1,0] train.micro_batch=8"
    python tools/vqa_probe.py 500 $A
    python tools/vqa_probe.py 500 $A model.init_std=0.02       # the decoder's default init
    python tools/vqa_probe.py 500 $A data.image=data/toy/vqa_image_train    # questions only
"""

import sys
import time

import torch

from fusion.config import finalize, load_config
from fusion.data.mixing import build_batches
from fusion.data.tokenizer import build_tokenizer
from fusion.eval.vqa import evaluate
from fusion.model.fusion import build_model
from fusion.step import param_groups

steps = int(sys.argv[1])
torch.set_num_threads(1)
cfg = load_config("configs/demo.yaml", sys.argv[2:])
finalize(cfg, 1)
torch.manual_seed(0)
tok = build_tokenizer(cfg.data.tokenizer)
model = build_model(cfg.model, tok)
model.tokenizer = tok
opt = torch.optim.AdamW(
    param_groups(model, cfg.train.weight_decay, cfg.model.vision),
    lr=cfg.train.lr,
    betas=tuple(cfg.train.betas),
)
for g in opt.param_groups:
    g["base"] = cfg.train.lr * g.get("lr_scale", 1.0)
batches = build_batches(cfg, tok, 0, 1)
t0 = time.time()
acc = 0.0
n = 0
for step in range(1, steps + 1):
    w = min(1.0, step / cfg.train.warmup)
    for g in opt.param_groups:
        g["lr"] = g["base"] * w
    b = next(batches)
    out = model(
        b["input_ids"],
        labels=b["labels"],
        positions=b["positions"],
        doc_ids=b["doc_ids"],
        sample_modality=b["sample_modality"],
        images=b.get("images"),
        videos=b.get("videos"),
    )
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    acc += out.loss_sum.sum().item()
    n += out.loss_count.sum().item()
    if step % int(__import__("os").environ.get("LOGE", 50)) == 0:
        print(
            step,
            f"{acc / n:.3f}",
            (out.loss_sum / out.loss_count.clamp(min=1)).tolist(),
            f"{time.time() - t0:.0f}s",
            flush=True,
        )
        acc = n = 0
    if step % int(__import__("os").environ.get("EVERY", 250)) == 0:
        model.eval()
        r = evaluate(
            model, __import__("os").environ.get("TEST", "data/toy/vqa_image_test"), limit=300, progress=False
        )
        model.train()
        print(
            "EVAL",
            step,
            round(r["overall"]["acc"], 3),
            "blind",
            round(r["overall"]["blind_acc"], 3),
            {k: round(v["acc"], 2) for k, v in r["by_type"].items()},
            flush=True,
        )
