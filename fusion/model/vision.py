"""The vision path: image / video pixels -> embeddings of the decoder width, ready to splice.

Owns the three encoders (`TimmEncoder`: any timm ViT, patch tokens only; `PatchLinear`: Fuyu-style,
no transformer; `ConvStem`: a small stack of strided 3x3 convolutions, no transformer), Llama 4's `pixel_shuffle` (and its inverse), the `Projector` adapter, and the
`VisionTower` that chains them and does video temporal merging and frame positions. Pixels arrive
normalised by the loader (`VisionConfig.mean` / `std`); nothing here downloads weights.

Shapes: N images, M videos, F frames per video, k frames merged per group (`temporal_merge`),
G = F // k frame groups, C channels (encoder width, or pixel channels 3), H, W pixels,
P patches per image, T tokens per image after the optional pixel-shuffle (P or P / 4),
D decoder dim.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from fusion.config import VisionConfig
from fusion.schema import tokens_per_image

PATCH_LINEAR = "patch-linear"
CONV_STEM = "conv-stem"
SHUFFLE_RATIO = 0.5  # Llama 4: 2x2 neighbouring patches become one token with 4x the channels


# ---------------------------------------------------------------------------------------------
# encoders: (N, 3, H, W) -> (N, P, C), with .grid (patches per side), .n_patches and .width
# ---------------------------------------------------------------------------------------------


class PatchGrid(nn.Module):
    """Base of our own encoders: a grid of patch_size x patch_size tokens and a learned position
    per token. Subclasses build their layers, then call `_add_positions()` (last, so the order of
    random draws, and with it a seeded model's initial weights, does not depend on this base)."""

    def __init__(self, img_size: int, patch_size: int, width: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.n_patches = self.grid**2
        self.width = width

    def _add_positions(self) -> None:
        self.pos_embed = nn.Parameter(torch.randn(self.n_patches, self.width) * 0.02)


class PatchLinear(PatchGrid):
    """Fuyu-style encoder: cut non-overlapping patches, one Linear each, plus a learned position.

    The patch is flattened in (channel, row, column) order, so the Linear is the same map as a
    Conv2d with kernel = stride = patch_size whose weight is `linear.weight.view(width, 3, p, p)`.
    """

    def __init__(self, img_size: int, patch_size: int, width: int, in_chans: int = 3):
        super().__init__(img_size, patch_size, width)
        self.proj = nn.Linear(in_chans * patch_size**2, width)
        self._add_positions()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p, g = self.patch_size, self.grid
        x = images.unflatten(2, (g, p)).unflatten(4, (g, p))  # (N, 3, g, p, g, p)
        x = x.permute(0, 2, 4, 1, 3, 5).flatten(3)  # (N, g, g, 3*p*p)
        x = x.flatten(1, 2)  # (N, P, 3*p*p), patches in row-major order
        return self.proj(x) + self.pos_embed  # (N, P, C)


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
    """Output channels of each `ConvStem` convolution: one stride-1 conv, then log2(patch_size)
    stride-2 convs doubling the channels up to `width` (the last one always gives `width`)."""
    n_down = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << n_down != patch_size:
        raise ValueError(
            f"vision.encoder {CONV_STEM!r} needs a patch_size that is a power of 2 "
            f"(its total stride), got {patch_size}"
        )
    first = max(16, width >> n_down)  # the full-resolution conv is the costly one: keep it narrow
    return [min(width, first << k) for k in range(n_down)] + [width]


class ConvStem(PatchGrid):
    """A convolutional stem in place of a ViT (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"): 3x3 convolutions with GELU between them, one at stride 1 and then
    log2(patch_size) at stride 2, so one output position covers a patch_size x patch_size patch as a
    patch-linear token does, but each token sees about 4 patch_size pixels around it: a small object
    cut by a patch border still lands whole in one token's view. Plus a learned position per token.
    """

    def __init__(self, img_size: int, patch_size: int, width: int, in_chans: int = 3):
        super().__init__(img_size, patch_size, width)
        channels = conv_stem_channels(patch_size, width)
        layers: list[nn.Module] = []
        for k, (c_in, c_out) in enumerate(zip([in_chans] + channels[:-1], channels)):
            if k:
                layers.append(nn.GELU())
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=1 if k == 0 else 2, padding=1))
        self.convs = nn.Sequential(*layers)
        self._add_positions()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.convs(images.contiguous(memory_format=torch.channels_last))  # (N, C, g, g), NHWC
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (N, P, C), row-major


def create_timm_vit(name: str, img_size: int, patch_size: int) -> nn.Module:
    """A timm ViT by name, without pretrained weights (nothing is downloaded), with a square patch
    grid of img_size / patch_size; ValueError naming `vision.encoder` for anything else. Under
    `torch.device("meta")` it allocates nothing (fusion-plan counts parameters this way)."""
    import timm  # imported here: a text-only or own-encoder run does not pay for it

    try:
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            patch_size=patch_size,
            dynamic_img_size=False,
        )
    except TypeError as e:
        raise ValueError(
            f"timm model {name!r} does not take img_size / patch_size / dynamic_img_size ({e}); "
            "vision.encoder must be a ViT-style timm model such as 'vit_tiny_patch16_224', "
            f"or {PATCH_LINEAR!r} / {CONV_STEM!r}"
        ) from e
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"vision.encoder {name!r} is not a timm model name ({e})") from e
        raise
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(
            f"timm model {name!r} has no patch_embed.grid_size / num_prefix_tokens: "
            "vision.encoder must be a ViT-style model"
        )
    if grid[0] != grid[1]:
        raise ValueError(f"timm model {name!r} has a non-square patch grid {grid[0]}x{grid[1]}")
    return model


class TimmPatchEmbed(Protocol):
    """What `TimmViT` reads of a timm patch embedding."""

    grid_size: tuple[int, int]  # (rows, columns) of the patch grid


class TimmViT(Protocol):
    """What `TimmEncoder` reads of a timm ViT, which timm types as a plain nn.Module
    (`create_timm_vit` checks `patch_embed.grid_size` and `num_prefix_tokens`)."""

    patch_embed: TimmPatchEmbed
    num_features: int  # width C of the patch tokens
    num_prefix_tokens: int  # CLS / register tokens before the patch tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...


class TimmEncoder(nn.Module):
    """A timm ViT that returns patch tokens only (CLS / register prefix tokens dropped).

    Built with `pretrained=False` always; `checkpoint` names a local weights file to load instead.
    `freeze` turns off its gradients and keeps it in eval mode (dropout / drop-path off) even when
    the surrounding model is put in train mode.
    """

    def __init__(self, name: str, img_size: int, patch_size: int, checkpoint: str = "", freeze: bool = False):
        super().__init__()
        self.model = create_timm_vit(name, img_size, patch_size)
        gh, gw = self.vit.patch_embed.grid_size
        self.name = name
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = gh
        self.n_patches = gh * gw
        self.width = self.vit.num_features
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        if checkpoint:
            load_encoder_weights(self.model, checkpoint)
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def vit(self) -> TimmViT:
        """`model`, typed as what is read of it."""
        return cast(TimmViT, self.model)

    def train(self, mode: bool = True) -> TimmEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # a frozen encoder keeps no activations for backward: nothing upstream of it trains
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self.vit.forward_features(images)  # (N, prefix + P, C)
        if x.ndim != 3 or x.shape[1] != self.num_prefix_tokens + self.n_patches:
            raise ValueError(
                f"timm model {self.name!r} forward_features gave {tuple(x.shape)}; "
                f"expected (N, {self.num_prefix_tokens} + {self.n_patches}, C)"
            )
        return x[:, self.num_prefix_tokens :]  # (N, P, C)


def load_encoder_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict (.safetensors, or .pt / .pth via torch.load) into a timm model.

    The model's own timm `checkpoint_filter_fn` is applied when it has one, the same conversion
    timm applies to hub weights (position-embedding resampling for another img_size, OpenCLIP /
    DINOv2 key layouts). Missing keys raise; unexpected keys raise except the classifier head,
    which the headless (num_classes=0) model has no place for.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"vision checkpoint {path} does not exist")
    state: Any  # whatever the file holds, until checked to be a flat dict of name -> tensor
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"vision checkpoint {path} could not be read: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"vision checkpoint {path} holds a {type(state).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"vision checkpoint {path} is not a flat dict of name -> tensor")

    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:
            state = filter_fn(state, model)
        own = model.state_dict()
        heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        state = {
            k: v
            for k, v in state.items()
            if k in own or not any(k == h or k.startswith(h + ".") for h in heads)
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:
        raise ValueError(f"vision checkpoint {path} does not fit {type(model).__name__}: {e}") from e
    if missing or unexpected:
        raise ValueError(
            f"vision checkpoint {path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}"
        )


# ---------------------------------------------------------------------------------------------
# pixel shuffle (Llama 4 vision adapter)
# ---------------------------------------------------------------------------------------------


def _shuffle_factor(ratio: float) -> int:
    s = round(1 / ratio)
    if s < 1 or not math.isclose(s * ratio, 1.0):
        raise ValueError(f"pixel-shuffle ratio {ratio} must be 1/s for an integer s >= 1")
    return s


def pixel_shuffle(x: torch.Tensor, ratio: float = SHUFFLE_RATIO) -> torch.Tensor:
    """(N, P, C) on a square grid -> (N, P * ratio^2, C / ratio^2): each s x s block (s = 1/ratio)
    of neighbouring patches becomes one token. Tokens stay in row-major order of the coarse grid;
    a token's channels are its block's patches in row-major order, [(0,0), (0,1), (1,0), (1,1)]
    at ratio 0.5 — the layout Llama 4's `pixel_shuffle` produces.
    """
    s = _shuffle_factor(ratio)
    n, p, c = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"pixel_shuffle needs a square patch grid; got {p} patches")
    if side % s:
        raise ValueError(f"pixel_shuffle ratio {ratio}: grid side {side} is not divisible by {s}")
    h = side // s
    x = x.view(n, h, s, h, s, c)  # (N, h, s, w, s, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h, w, s, s, C)
    return x.reshape(n, h * h, s * s * c)  # (N, P/s^2, s^2*C)


def pixel_unshuffle(x: torch.Tensor, ratio: float = SHUFFLE_RATIO) -> torch.Tensor:
    """The exact inverse of `pixel_shuffle`: (N, P', C') -> (N, P' / ratio^2, C' * ratio^2)."""
    s = _shuffle_factor(ratio)
    n, p, c = x.shape
    h = math.isqrt(p)
    if h * h != p:
        raise ValueError(f"pixel_unshuffle needs a square token grid; got {p} tokens")
    if c % (s * s):
        raise ValueError(f"pixel_unshuffle ratio {ratio}: {c} channels are not divisible by {s * s}")
    x = x.view(n, h, h, s, s, c // (s * s))  # (N, h, w, s, s, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h, s, w, s, C)
    return x.reshape(n, h * s * h * s, c // (s * s))  # (N, P, C)


# ---------------------------------------------------------------------------------------------
# projector and tower
# ---------------------------------------------------------------------------------------------


class Projector(nn.Module):
    """Llama 4's adapter: a 2-layer GELU MLP without biases (GELU after both layers, as in its
    `Llama4VisionMLP2`), then `Linear(hidden -> dim, bias=False)` into the decoder width."""

    def __init__(self, in_dim: int, hidden_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc2(F.gelu(self.fc1(x))))
        return self.proj(x)


class VisionTower(nn.Module):
    """Encoder -> optional pixel-shuffle -> optional temporal merge -> projector -> (…, T, D).

    Parameters are grouped by owner: `encoder.*` (the ViT or patch-linear, frozen by `freeze`),
    `projector.*`, and `frame_pos` (None when off).
    """

    encoder: PatchLinear | ConvStem | TimmEncoder
    frame_pos: nn.Parameter | None  # (G_max, D) learned frame-group positions, None when off

    def __init__(self, cfg: VisionConfig, dim: int, init_std: float = 0.02):
        super().__init__()
        if cfg.encoder in (PATCH_LINEAR, CONV_STEM):
            if cfg.checkpoint:
                raise ValueError(
                    f"vision.checkpoint {cfg.checkpoint!r} is set but vision.encoder is "
                    f"{cfg.encoder!r}, which has no checkpoint to load"
                )
            if cfg.freeze:
                raise ValueError(
                    f"vision.freeze with vision.encoder={cfg.encoder!r} would freeze "
                    "random weights; freeze applies to a timm encoder"
                )
            own = PatchLinear if cfg.encoder == PATCH_LINEAR else ConvStem
            self.encoder = own(cfg.img_size, cfg.patch_size, cfg.width or dim)
        else:
            self.encoder = TimmEncoder(
                cfg.encoder, cfg.img_size, cfg.patch_size, checkpoint=cfg.checkpoint, freeze=cfg.freeze
            )
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.shuffle = bool(cfg.pixel_shuffle)
        channels = self.encoder.width
        if self.shuffle:
            s = _shuffle_factor(SHUFFLE_RATIO)
            if self.encoder.grid % s:
                raise ValueError(
                    f"vision.pixel_shuffle needs an even patch grid; img_size {cfg.img_size} / "
                    f"patch_size {cfg.patch_size} gives {self.encoder.grid} patches per side"
                )
            channels *= s * s
        if cfg.temporal_merge < 1:
            raise ValueError(f"vision.temporal_merge must be >= 1, got {cfg.temporal_merge}")
        self.temporal_merge = cfg.temporal_merge
        self.projector = Projector(channels * self.temporal_merge, dim, dim)
        if cfg.frame_pos:
            n_groups = cfg.max_frames // self.temporal_merge
            if n_groups < 1:
                raise ValueError(
                    f"vision.max_frames {cfg.max_frames} is smaller than "
                    f"vision.temporal_merge {self.temporal_merge}"
                )
            self.frame_pos = nn.Parameter(torch.randn(n_groups, dim) * 0.02)  # (G_max, D)
        else:
            self.register_parameter("frame_pos", None)
        self.dim = dim
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float) -> None:
        """Initialise for scale, so pixels reach the decoder as loudly as words do: every layer of
        our own encoders and of the projector keeps its input's scale (He init: std sqrt(2 / fan_in)
        before a GELU, 1 / sqrt(fan_in) at the encoder's output), and the projector's last layer
        gives embeddings of about `init_std`, the scale of the decoder's token embeddings. With
        PyTorch's default init instead, shrinking layers left image embeddings an order of magnitude quieter
        than token embeddings, and a small decoder took hundreds of steps to start looking at them.
        A timm encoder keeps timm's own init (or its checkpoint)."""
        layers: list[nn.Conv2d | nn.Linear] = []
        if isinstance(self.encoder, ConvStem):
            layers += [m for m in self.encoder.convs if isinstance(m, nn.Conv2d)]
        elif isinstance(self.encoder, PatchLinear):
            layers.append(self.encoder.proj)
        for k, layer in enumerate(layers):
            gain = 1.0 if k == len(layers) - 1 else 2.0  # GELU follows all but the last
            fan_in = layer.weight[0].numel()
            nn.init.normal_(layer.weight, 0.0, math.sqrt(gain / fan_in))
            if layer.bias is not None:  # always: both kinds are built with a bias
                nn.init.zeros_(layer.bias)
        for layer in (self.projector.fc1, self.projector.fc2):
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / layer.in_features))
        proj = self.projector.proj
        nn.init.normal_(proj.weight, 0.0, init_std / math.sqrt(proj.in_features))

    # ---- token counts: what the sequence builder must reserve --------------------------------

    @property
    def tokens_per_image(self) -> int:
        return tokens_per_image(self.cfg)

    @property
    def tokens_per_frame_group(self) -> int:
        return self.tokens_per_image

    def video_tokens(self, n_frames: int) -> int:
        self._check_frames(n_frames)
        return n_frames // self.temporal_merge * self.tokens_per_image

    def _check_frames(self, n_frames: int) -> None:
        if n_frames % self.temporal_merge:
            raise ValueError(
                f"{n_frames} frames are not divisible by vision.temporal_merge {self.temporal_merge}"
            )

    # ---- encoding -----------------------------------------------------------------------------

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, T, C'): encoder patch tokens, pixel-shuffled when configured."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"vision input is {tuple(images.shape[-2:])} pixels; the encoder was "
                f"built for {self.img_size}x{self.img_size} (vision.img_size)"
            )
        dtype = next(self.encoder.parameters()).dtype
        x = self.encoder(images.to(dtype))  # (N, P, C)
        return pixel_shuffle(x) if self.shuffle else x  # (N, T, C')

    def _empty(self, *lead: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(
            *lead, self.tokens_per_image, self.dim, device=like.device, dtype=self.projector.proj.weight.dtype
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, T, D). With temporal_merge k an image is k identical frames
        (Qwen2-VL), so images and video frame groups share one projector."""
        if images.shape[0] == 0:
            return self._empty(0, like=images)
        x = self._features(images)  # (N, T, C')
        x = x.repeat(1, 1, self.temporal_merge)  # (N, T, k*C')
        return self.projector(x)  # (N, T, D)

    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        """(M, F, 3, H, W) -> (M, F // k, T, D). All M*F frames go through the encoder as one batch;
        each group of k consecutive frames is concatenated on channels; a learned position per
        frame group (when frame_pos) is added to all of the group's tokens."""
        m, f = videos.shape[:2]
        self._check_frames(f)
        g = f // self.temporal_merge
        if self.frame_pos is not None and g > self.frame_pos.shape[0]:
            raise ValueError(
                f"{f} frames make {g} frame groups; the frame-position table has "
                f"{self.frame_pos.shape[0]} (vision.max_frames // temporal_merge)"
            )
        if m == 0 or f == 0:
            return self._empty(m, g, like=videos)
        x = self._features(videos.flatten(0, 1))  # (M*F, T, C')
        t, c = x.shape[1:]
        x = x.view(m, g, self.temporal_merge, t, c)  # (M, G, k, T, C')
        x = x.permute(0, 1, 3, 2, 4).reshape(m, g, t, self.temporal_merge * c)  # (M, G, T, k*C')
        x = self.projector(x)  # (M, G, T, D)
        if self.frame_pos is not None:
            x = x + self.frame_pos[:g, None, :]  # (G, 1, D) broadcast over M and T
        return x
