"""Kernel choices and the shared expert's side stream, on CPU.

A recording stand-in for fusion/model/moe/streams.py's interface logs every wait, record and stream
switch: the fast MoE path must wait and record at each crossing between the main and the side
stream, forward and backward, and give exactly what the path without overlap gives. Also: the
kernel choice per device, `FusionModel.use_kernels`, `grouped_mm=True` on meta tensors (what a dry
run relies on), and the non-finite guard's sum across streams.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import pytest
import torch

from fusion.config import MoEConfig, load_config
from fusion.data.tokenizer import ByteTokenizer
from fusion.guard import NonFiniteGuard
from fusion.model import kernels as kernels_mod
from fusion.model.decoder import Attention
from fusion.model.fusion import build_model
from fusion.model.kernels import Kernels, default_kernels
from fusion.model.moe import CudaStreams, MoE, fast, grouped_mm_fits, grouped_mm_supported

D, H = 8, 16


class RecordingStreams:
    """The streams interface with named streams "main" and "side"; logs every call."""

    def __init__(self):
        self.stack = ["main"]
        self.events: list[
            tuple
        ] = []  # ("wait", waiter, waitee) | ("record", tensor, stream) | ("use", stream)

    def current(self):
        return self.stack[-1]

    def side(self):
        return "side"

    def wait(self, waiter, waitee):
        self.events.append(("wait", waiter, waitee))

    @contextlib.contextmanager
    def use(self, stream):
        self.events.append(("use", stream))
        self.stack.append(stream)
        try:
            yield
        finally:
            self.stack.pop()

    def record(self, tensor, stream):
        self.events.append(("record", tensor, stream))

    def calls(self):
        """The events without their tensors."""
        return [(e[0], e[2]) if e[0] == "record" else e for e in self.events]


def make_moe(**kw) -> MoE:
    cfg = dict(
        n_experts=4,
        top_k=2,
        n_shared=1,
        moe_ffn_dim=H,
        score="sigmoid",
        gate_on="input",
        balance="aux",
        z_coef=1e-3,
        path="fast",
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return MoE(D, MoEConfig(**cfg), init_std=0.3).train()


def run(moe: MoE, x, valid, g):
    x = x.clone().requires_grad_(True)
    y, aux, z = moe(x, valid)
    ((y * g).sum() + aux + z).backward()
    return [y.detach(), aux.detach(), z.detach(), x.grad] + [p.grad for p in moe.parameters()]


def inputs(seed=1, B=2, T=7):
    torch.manual_seed(seed)
    return torch.randn(B, T, D), torch.rand(B, T) > 0.3, torch.randn(B, T, D)


# ---------------------------------------------------------------------------------------------
# the side stream of the fast path
# ---------------------------------------------------------------------------------------------


def test_every_crossing_is_waited_and_recorded_forward_and_backward():
    moe = make_moe()
    rec = RecordingStreams()
    moe.streams = rec
    seen = {}  # module -> the stream current when it ran

    def note(name):
        def hook(module, args):
            seen.setdefault(name, rec.current())

        return hook

    moe.shared.register_forward_pre_hook(note("shared"))
    moe.router.register_forward_pre_hook(note("router"))
    x, valid, g = inputs()
    x = x.requires_grad_(True)
    y, aux, z = moe(x, valid)
    assert seen == {"shared": "side", "router": "main"}
    forward = rec.calls()
    assert forward == [
        ("use", "side"),
        ("wait", "side", "main"),
        ("record", "side"),
        ("wait", "main", "side"),
        ("record", "main"),
    ]
    # what crossed: the layer's input (same memory as x) to the side, the shared output back
    xf, shared_out = rec.events[2][1], rec.events[4][1]
    assert xf.data_ptr() == x.data_ptr() and xf.shape == (14, D)
    torch.testing.assert_close(shared_out, moe.shared(x.detach().reshape(14, D)), rtol=0, atol=0)

    rec.events.clear()
    ((y * g).sum() + aux + z).backward()
    assert rec.calls() == [
        ("wait", "side", "main"),
        ("record", "side"),  # dL/d(shared out) to the side
        ("wait", "main", "side"),
        ("record", "main"),
    ]  # dL/d(xf) back to main
    grad_out, grad_in = rec.events[1][1], rec.events[3][1]
    torch.testing.assert_close(grad_out, g.reshape(14, D), rtol=0, atol=0)
    xs = x.detach().reshape(14, D).requires_grad_(True)
    (expected,) = torch.autograd.grad(moe.shared(xs), xs, g.reshape(14, D))
    torch.testing.assert_close(grad_in, expected)


@pytest.mark.parametrize("k,gate_on,valid", [(1, "input", True), (2, "output", False), (3, "input", True)])
def test_overlap_gives_what_the_path_without_overlap_gives(k, gate_on, valid):
    plain = make_moe(top_k=k, gate_on=gate_on)
    side = copy.deepcopy(plain)
    side.streams = RecordingStreams()
    x, v, g = inputs()
    v = v if valid else None
    for a, b in zip(run(plain, x, v, g), run(side, x, v, g)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(side.take_load(), plain.take_load(), rtol=0, atol=0)
    assert len(side.streams.events) == 9  # 5 forward, 4 backward


def test_no_streams_object_no_overlap_and_no_shared_expert_no_crossing():
    moe = make_moe()
    assert moe.streams is None and not fast.overlaps_shared(moe)
    bare = make_moe(n_shared=0)
    bare.streams = RecordingStreams()
    run(bare, *inputs())
    assert bare.streams.events == []


def test_no_overlap_while_compiling():
    """A compiled graph has one stream: the layer's streams object is not used while tracing."""
    from torch._dynamo.testing import CompileCounter

    moe = make_moe(top_k=1)
    rec = RecordingStreams()
    moe.streams = rec
    counter = CompileCounter()
    x, valid, _ = inputs()
    with torch.no_grad():
        y = torch.compile(moe, backend=counter)(x, valid)[0]
        ref = copy.deepcopy(moe)
        ref.streams = None
        torch.testing.assert_close(y, ref(x, valid)[0])
    assert counter.frame_count >= 1 and rec.events == []


# ---------------------------------------------------------------------------------------------
# kernel choices
# ---------------------------------------------------------------------------------------------


def test_kernels_for_cpu_meta_and_cuda(monkeypatch):
    assert Kernels.for_device("cpu", torch.float32) == Kernels(grouped_mm=True)
    assert Kernels.for_device(torch.device("cpu"), torch.bfloat16) == Kernels(grouped_mm=True)
    assert Kernels.for_device("cpu", torch.float64) == Kernels()
    assert Kernels.for_device("meta", torch.bfloat16) == Kernels()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Kernels.for_device("cuda", torch.bfloat16) == Kernels()  # no driver: nothing special
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, dtype, grouped_mm in [
        ((9, 0), torch.bfloat16, True),
        ((8, 0), torch.bfloat16, False),
        ((9, 0), torch.float32, False),
        ((10, 0), torch.bfloat16, True),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        assert Kernels.for_device("cuda:0", dtype) == Kernels(
            grouped_mm=grouped_mm, side_stream=True, compile_flex=True
        ), (cap, dtype)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Kernels().grouped_mm = True


def test_default_kernels_are_asked_once_per_device_and_dtype(monkeypatch):
    calls = []
    real = Kernels.for_device
    monkeypatch.setattr(kernels_mod, "_DEFAULTS", {})
    monkeypatch.setattr(Kernels, "for_device", staticmethod(lambda d, t: calls.append((d, t)) or real(d, t)))
    moe = make_moe()
    for _ in range(3):
        run(moe, *inputs())
    assert calls == [(torch.device("cpu"), torch.float32)]
    assert default_kernels("cpu", torch.float32) == Kernels(grouped_mm=True) and len(calls) == 1


def test_grouped_mm_static_checks():
    w = torch.zeros(2, 8, 16)
    assert grouped_mm_fits(torch.zeros(3, 8), w) and grouped_mm_supported(torch.zeros(3, 8), w)
    assert not grouped_mm_fits(torch.zeros(3, 6), torch.zeros(2, 6, 16))  # 24-byte rows
    assert not grouped_mm_fits(torch.zeros(3, 8, dtype=torch.float64), w.double())  # no fp64 kernel
    meta = {"device": "meta"}
    assert grouped_mm_fits(
        torch.empty(3, 8, dtype=torch.bfloat16, **meta), torch.empty(2, 8, 16, dtype=torch.bfloat16, **meta)
    )
    assert not grouped_mm_fits(torch.empty(3, 8, **meta), torch.empty(2, 8, 16, **meta))  # meta: bf16 only
    # meta tensors: the kernel is wanted only when the choice says so
    assert not grouped_mm_supported(
        torch.empty(3, 8, dtype=torch.bfloat16, **meta), torch.empty(2, 8, 16, dtype=torch.bfloat16, **meta)
    )


@pytest.mark.parametrize("use_streams", [False, True])
def test_fast_path_on_meta_tensors_with_grouped_mm(monkeypatch, use_streams):
    """What a dry run does: `Kernels(grouped_mm=True)` sends meta bf16 operands to
    torch._grouped_mm (its meta kernel checks strides and alignment); forward and backward run
    without reading a value (the per-expert loop would need the offsets on the host)."""
    with torch.device("meta"):
        moe = make_moe().to(torch.bfloat16)
    moe.experts.kernels = Kernels(grouped_mm=True, side_stream=use_streams)
    if use_streams:
        moe.streams = RecordingStreams()
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[0].device) or real(*a, **k))
    x = torch.empty(2, 5, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y, aux, z = moe(x, torch.empty(2, 5, device="meta", dtype=torch.bool))
    (y.float().sum() + aux + z).backward()
    assert calls == [torch.device("meta")] * 3
    assert x.grad.shape == x.shape and moe.experts.w2.grad.shape == moe.experts.w2.shape
    if use_streams:
        assert len(moe.streams.events) == 9


def tiny_model(*overrides):
    cfg = load_config(
        None,
        [
            "model.vision.img_size=32",
            "model.vision.patch_size=8",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.moe.every=1",
            "model.moe.path=fast",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return build_model(cfg.model, ByteTokenizer())


def test_use_kernels_reaches_every_moe_layer_and_attention():
    model = tiny_model()
    rec = RecordingStreams()
    choice = Kernels(grouped_mm=True, side_stream=True, compile_flex=False)
    model.use_kernels(choice, streams=rec)
    assert len(model.moe_layers) == 2
    assert all(m.streams is rec and m.experts.kernels is choice for m in model.moe_layers)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert attns and all(a.kernels is choice for a in attns) and model.decoder.kernels is choice
    ids = torch.randint(0, 200, (2, 9))
    model(ids)
    assert rec.calls().count(("wait", "side", "main")) == 2  # each layer's input crossed
    model.use_kernels(Kernels(grouped_mm=True))  # no side stream: overlap off
    assert all(m.streams is None for m in model.moe_layers)
    with pytest.raises(ValueError, match="side_stream is False"):
        model.use_kernels(Kernels(), streams=rec)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model.use_kernels(Kernels(side_stream=True))  # default CudaStreams on a CPU model
    with pytest.raises(TypeError):
        model.use_kernels({"grouped_mm": True})


def test_compile_flex_choice_reaches_flex_attention(monkeypatch):
    from fusion.model import decoder as decoder_mod

    model = tiny_model("model.attn_impl=flex").eval()
    seen = []
    real = decoder_mod._block_mask
    monkeypatch.setattr(
        decoder_mod,
        "_block_mask",
        lambda mask_mod, like, compiled=None: seen.append(compiled) or real(mask_mod, like, False),
    )
    ids = torch.randint(0, 200, (1, 9))
    doc = torch.zeros(1, 9, dtype=torch.long)
    with torch.no_grad():
        model(ids, doc_ids=doc)
        model.use_kernels(Kernels(compile_flex=True))
        model(ids, doc_ids=doc)
    assert seen == [False, True]  # CPU by default: uncompiled; then the choice


# ---------------------------------------------------------------------------------------------
# the non-finite guard across streams
# ---------------------------------------------------------------------------------------------


def test_guard_sums_gradients_from_the_side_stream_on_its_own_stream():
    model = torch.nn.Linear(4, 4)
    rec = RecordingStreams()
    guard = NonFiniteGuard(model, [], torch.device("cpu"), streams=rec)
    plain = NonFiniteGuard(torch.nn.Linear(4, 4), [], torch.device("cpu"))
    g1, g2 = torch.randn(4, 4), torch.randn(4)
    guard._watch(g1)  # on main: no crossing
    plain._watch(g1)
    assert rec.events == []
    with rec.use("side"):
        rec.events.clear()
        guard._watch(g2)  # produced on the side stream
    assert rec.calls() == [("wait", "main", "side"), ("record", "main"), ("use", "main")]
    torch.testing.assert_close(rec.events[1][1], g2.square().sum())
    plain._watch(g2)
    torch.testing.assert_close(guard.grad_sq, plain.grad_sq)
    with rec.use("side"):
        guard._watch(torch.tensor([float("nan")]))
    assert guard.decide() and not guard.decide()


def test_cuda_streams_refuses_other_devices():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaStreams("cpu")
