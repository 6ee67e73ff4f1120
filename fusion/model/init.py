"""The weight-initialisation rule of the decoder, its MoE layers and late fusion's blocks.

One rule, applied once to each parameter by the module that builds it:

- every weight matrix (token embeddings, output head, attention wq / wk / wv, feed-forward w1 / w3,
  router gate): N(0, init_std);
- the matrices that write into the residual stream (attention `wo`, the dense FFN's and the shared
  expert's `w2`, and the same matrices of late fusion's blocks): N(0, init_std / sqrt(2 * n_layers)),
  GPT-2's scaling (Radford et al. 2019, section 2.3): the residual stream sums two such outputs per
  layer, and the scale keeps the variance of that sum bounded with depth. n_layers None (a layer
  built on its own, as in tests) leaves them at init_std;
- the routed experts' stacked weights (E, D, H) and (E, H, D): N(0, init_std), w2 included;
- norms 1 and biases 0 (late fusion's gates 0: its blocks start closed), set where they are built.

The vision tower has its own rule (fusion/model/vision.py: He init, which keeps its activations'
scale through layers that change width).

Shape legend: a matrix of nn.Linear is (out, in); D model dim, E experts, H expert hidden width.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from fusion.model.ffn import FeedForward


class Projections(Protocol):
    """An attention block's projections: the decoder's `Attention` (fusion/model/decoder.py) and
    late fusion's `CrossAttention` (fusion/model/late.py)."""

    wq: nn.Linear
    wk: nn.Linear
    wv: nn.Linear
    wo: nn.Linear


def residual_std(init_std: float, n_layers: int | None) -> float:
    """The std of a matrix that writes into the residual stream of an n_layers decoder."""
    return init_std if n_layers is None else init_std / math.sqrt(2 * n_layers)


def init_matrix(
    weight: torch.Tensor, init_std: float, n_layers: int | None = None, residual: bool = False
) -> None:
    """Draw a weight matrix (or a stack of them) in place: N(0, init_std), or N(0, residual_std)
    when it writes into the residual stream."""
    std = residual_std(init_std, n_layers) if residual else init_std
    nn.init.normal_(weight, 0.0, std)


def init_linear(
    layer: nn.Linear, init_std: float, n_layers: int | None = None, residual: bool = False
) -> None:
    """`init_matrix` of the layer's weight; its bias, if any, 0."""
    init_matrix(layer.weight, init_std, n_layers, residual)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_attention(attn: Projections, init_std: float, n_layers: int | None) -> None:
    """Self- or cross-attention: wq, wk, wv N(0, init_std); wo writes into the residual stream."""
    for layer in (attn.wq, attn.wk, attn.wv):
        init_linear(layer, init_std)
    init_linear(attn.wo, init_std, n_layers, residual=True)


def init_feed_forward(ffn: FeedForward, init_std: float, n_layers: int | None) -> None:
    """A SwiGLU block (fusion/model/ffn.py): w1, w3 N(0, init_std); w2 writes into the residual
    stream."""
    init_linear(ffn.w1, init_std)
    init_linear(ffn.w3, init_std)
    init_linear(ffn.w2, init_std, n_layers, residual=True)
