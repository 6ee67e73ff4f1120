"""Images: decode safely, resize, encode, and turn into a normalised tensor. Pure functions.

    read_image(data, max_pixels) -> Decoded(image, format, rotated)   RGB, upright
    open_image(data, max_pixels) -> PIL.Image                          RGB, upright
    resize(img, max_side, mode) -> PIL.Image                           keep_ratio | center_crop | pad | none
    encode(img, fmt, quality) -> bytes                                 jpg | png | webp
    to_tensor(img, size, mean, std, train, rng) -> float32 (3, size, size)

Used by the shard builder (`fusion-data images|vqa`), by `fusion-data verify` and by the training
loader, so a bad image fails the same way everywhere, as `SampleError(reason)`:

- `empty_file`          0 bytes;
- `unsupported_format`  a real file of another kind (PDF, FITS, TIFF, HEIC/AVIF, SVG, a video...),
                        whatever its name says: only JPEG (and MPO, a JPEG with extra pictures),
                        PNG, WEBP, GIF (first frame) and BMP are decoded;
- `too_many_pixels`     width x height from the header over `max_pixels`, refused before any pixel
                        is decoded; Pillow's own bomb guard (`Image.MAX_IMAGE_PIXELS`, 89.5 M
                        pixels; it warns above and raises at twice that) counts the same way.
                        The global limit is never changed here: raising it is the application's call;
- `bad_image`           truncated, corrupt or unidentifiable bytes. The image is decoded fully with
                        `load()`: `Image.verify()` passes a JPEG cut in half (FIELD-NOTES).

Colour: palette, grey, 16-bit grey (scaled, not clipped), CMYK and alpha images become RGB; alpha
(and palette or tRNS transparency) is composited on white. The EXIF orientation is applied, so a
phone picture comes out upright; ICC profiles are ignored (pixel values are taken as sRGB).

torch is imported only by `to_tensor`.
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fusion.data.shards import SampleError

# Pillow warns at 89.5 M pixels; 50 M (e.g. 8660 x 5773) keeps a worker's decoded RGB image under
# 150 MB while admitting any ordinary photograph.
DEFAULT_MAX_PIXELS = 50_000_000
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # Pillow plugin ids that are decoded
RESIZE_MODES = ("keep_ratio", "center_crop", "pad", "none")
ENCODINGS = ("jpg", "png", "webp")
EXTENSION = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # formats a shard stores as is
WHITE = (255, 255, 255)
# EXIF orientation tag (0x0112) value -> the transposition that makes the picture upright.
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Where Pillow's `getexif` finds an orientation (EXIF proper, PNG's text form, XMP), once loaded.
_EXIF_INFO = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})

# Files Pillow cannot (or must not) open, told apart from garbage by their first bytes.
_FOREIGN = (
    (b"%PDF-", "PDF"),
    (b"SIMPLE  =", "FITS"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
    (b"<!DOCTYPE", "HTML"),
    (b"<html", "HTML"),
)


class Decoded(NamedTuple):
    image: Image.Image  # mode RGB, EXIF orientation applied, fully decoded
    format: str  # Pillow's name of the source format: JPEG, MPO, PNG, WEBP, GIF, BMP
    rotated: bool  # True when an EXIF orientation was applied (the source bytes are sideways)


def _foreign_format(data: bytes) -> str | None:
    head = data[:32]
    for magic, name in _FOREIGN:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":  # ISO media: mp4 / mov, and HEIC / AVIF pictures
        return f"ISO media ({head[8:12].decode('latin-1').strip()})"
    return None


def _identify(data: bytes) -> str | None:
    """The format name any Pillow plugin gives these bytes (header only, nothing decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format
    except Image.DecompressionBombError:
        return "an image of another format"
    except Exception:  # UnidentifiedImageError and whatever a plugin raises on garbage
        return None


def read_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode an image file completely into upright RGB, or raise SampleError(reason)."""
    if not data:
        raise SampleError("empty_file", "0 bytes")
    foreign = _foreign_format(data)
    if foreign:
        raise SampleError("unsupported_format", f"a {foreign} file, not an image")
    with warnings.catch_warnings():
        # Pillow's bomb warning fires inside Image.open, before our own check could: count it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
            raise SampleError("too_many_pixels", str(exn)) from None
        except UnidentifiedImageError:
            other = _identify(data)
            if other:
                raise SampleError(
                    "unsupported_format", f"{other} is not decoded (only {', '.join(FORMATS)})"
                ) from None
            raise SampleError("bad_image", "not a recognisable image") from None
        except Exception as exn:  # a plugin choking on a damaged header
            raise SampleError("bad_image", f"{type(exn).__name__}: {exn}") from None
        with im:
            width, height = im.size
            if width * height > max_pixels:  # from the header: nothing decoded yet
                raise SampleError(
                    "too_many_pixels", f"{width}x{height} = {width * height:,} pixels > {max_pixels:,}"
                )
            if width < 1 or height < 1:
                raise SampleError("bad_image", f"size {width}x{height}")
            fmt = im.format
            try:
                im.load()  # the full decode: a truncated file fails here
                # parsing an absent EXIF block costs ~15% of decoding a small picture
                has_exif = not _EXIF_INFO.isdisjoint(im.info)
                orientation = im.getexif().get(0x0112, 1) if has_exif else 1
                rgb = to_rgb(im)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
                raise SampleError("too_many_pixels", str(exn)) from None
            except Exception as exn:
                raise SampleError("bad_image", f"{type(exn).__name__}: {exn}") from None
    rotated = orientation in _ORIENT
    if rotated:
        rgb = rgb.transpose(_ORIENT[orientation])
    return Decoded(rgb, fmt, rotated)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An image file's bytes -> a fully decoded, upright RGB image; SampleError(reason) if not
    usable (see the module docstring for the reasons)."""
    return read_image(data, max_pixels).image


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha and transparency composited on white, 16-bit grey scaled."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX


def resize(img: Image.Image, max_side: int, mode: str = "keep_ratio") -> Image.Image:
    """Resize for storage; returns `img` itself when nothing changes.

    - keep_ratio:  the longer side becomes at most `max_side` (never enlarged);
    - center_crop: exactly max_side x max_side: the shorter side scaled to max_side, the middle kept;
    - pad:         exactly max_side x max_side: the longer side scaled to max_side, centred on white;
    - none, or max_side 0: unchanged.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    if mode == "none" or max_side <= 0:
        return img
    lanczos = Image.Resampling.LANCZOS
    width, height = img.size
    if mode == "keep_ratio":
        if max(width, height) <= max_side:
            return img
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return img.resize(size, lanczos)
    if img.size == (max_side, max_side):
        return img
    if mode == "center_crop":
        return ImageOps.fit(img, (max_side, max_side), method=lanczos)
    return ImageOps.pad(img, (max_side, max_side), method=lanczos, color=WHITE)


def encode(img: Image.Image, fmt: str = "jpg", quality: int = 90) -> bytes:
    """RGB image -> file bytes; deterministic (no metadata, no timestamps). `quality` (1-100)
    is used by jpg and webp; png is lossless."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, "PNG")
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"image encoding {fmt!r}: expected one of {', '.join(ENCODINGS)}")
    return buf.getvalue()


def to_tensor(
    img: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    rng: random.Random | None = None,
    scale: tuple[float, float] = (0.8, 1.0),
):
    """RGB image -> normalised float32 tensor (3, size, size).

    Evaluation (train=False): the shorter side resized to `size`, the centre `size` x `size` kept:
    deterministic. Training: a square whose side is a fraction in `scale` of the shorter side, at
    a random position drawn from `rng`, resized to `size` (a mild random-resized crop).
    """
    import torch

    bicubic = Image.Resampling.BICUBIC
    width, height = img.size
    if train:
        rng = rng if rng is not None else random.Random()
        side = max(1, round(min(width, height) * rng.uniform(*scale)))
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        img = img.resize((size, size), bicubic, box=(left, top, left + side, top + side))
    else:
        ratio = size / min(width, height)
        scaled = (max(size, round(width * ratio)), max(size, round(height * ratio)))
        if scaled != img.size:
            img = img.resize(scaled, bicubic)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    if img.mode != "RGB":
        img = img.convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
    x = x.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s
