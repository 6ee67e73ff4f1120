"""read_image: orientation from every place Pillow keeps it, and none where there is none."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fusion.data.images import read_image


def picture(fmt: str, **save) -> bytes:
    a = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high; a red left half
    a[:, :16, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **save)
    return buf.getvalue()


def exif(orientation: int) -> Image.Exif:
    e = Image.Exif()
    e[0x0112] = orientation
    return e


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
    b'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


@pytest.mark.parametrize(
    "data",
    [
        picture("PNG", exif=exif(6)),
        picture("WEBP", exif=exif(6), lossless=True),
        picture("JPEG", exif=exif(6), quality=95),
        picture("JPEG", xmp=XMP, quality=95),
    ],
    ids=["png-exif", "webp-exif", "jpeg-exif", "jpeg-xmp"],
)
def test_orientation_is_applied_wherever_it_is_stored(data):
    d = read_image(data)
    assert d.rotated and d.image.size == (16, 32)  # turned upright: now 16 wide, 32 high
    top = np.asarray(d.image)[:8].astype(int)
    assert top[..., 0].mean() > 200  # the red half, on the left before, is on top after


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_a_picture_without_metadata_is_left_as_it_is(fmt):
    d = read_image(picture(fmt))
    assert not d.rotated and d.image.size == (32, 16) and d.image.mode == "RGB"
