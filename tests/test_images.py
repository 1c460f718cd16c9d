"""minisd/images.py: every image mode becomes the RGB its pixels mean (a 16-bit PNG is not white), and the
settings a generated image carries read back from PNG, JPEG and WebP files."""

import io

import numpy as np
import pytest
from PIL import Image

from minisd.data import decode
from minisd.images import read_settings, save_with_settings, to_rgb


def png_bytes(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    buffer.seek(0)
    return buffer


def rgb(image: Image.Image) -> list[tuple]:
    """The pixels of to_rgb(image), left to right."""
    out = to_rgb(image)
    assert out.mode == "RGB"
    return [tuple(int(c) for c in p) for p in np.asarray(out).reshape(-1, 3)]


def test_16_bit_grayscale_png_by_its_range():
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    with Image.open(png_bytes(Image.fromarray(levels))) as image:
        assert image.mode.startswith("I")  # I;16 (or I in older Pillow)
        assert np.asarray(image.convert("RGB"))[0, 1:].min() == 255  # PIL alone clips: all but black is white
        assert rgb(image) == [(v, v, v) for v in (0, 64, 128, 255)]
    # the training data reader too
    assert (np.asarray(decode(png_bytes(Image.fromarray(levels)))).reshape(-1, 3)[:, 0].tolist()
            == [0, 64, 128, 255])


@pytest.mark.parametrize("mode, pixels, expected", [
    # 16-bit range in 32-bit pixels
    ("I", np.array([[0, 32896, 65535]], dtype=np.int32), [0, 128, 255]),
    ("I;16B", np.array([[0, 32896, 65535]], dtype=">u2"), [0, 128, 255]),
    # floats in [0, 1], clipped
    ("F", np.array([[0.0, 0.25, 1.0, 2.0]], dtype=np.float32), [0, 64, 255, 255]),
])
def test_wide_modes(mode, pixels, expected):
    image = Image.frombytes(mode, pixels.shape[::-1], pixels.tobytes())
    assert rgb(image) == [(v, v, v) for v in expected]


def test_transparent_pixels_are_on_white():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 0))    # transparent: white, whatever gray it hides
    la.putpixel((1, 0), (100, 255))  # opaque: itself
    assert rgb(la) == [(255, 255, 255), (100, 100, 100)]
    rgba = Image.new("RGBA", (1, 1), (0, 0, 0, 128))  # half black over white
    assert rgb(rgba) == [(127, 127, 127)]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # colour 0 (black) is transparent
    with Image.open(png_bytes(palette)) as image:
        assert rgb(image) == [(255, 255, 255), (200, 10, 10)]


def test_modes_pil_converts_right_stay_as_they_were():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    assert rgb(cmyk) == [(255, 255, 255), (0, 255, 255)]  # no ink: white; full cyan
    for image in (Image.new("RGB", (1, 1), (1, 2, 3)), Image.new("L", (1, 1), 77), Image.new("1", (1, 1), 1)):
        assert rgb(image) == [tuple(image.convert("RGB").getpixel((0, 0)))]


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_settings_read_back(tmp_path, suffix):
    settings = {"prompt": "café ☕, \"quoted\"", "seed": "7", "guidance": "7.5"}
    path = tmp_path / f"x.{suffix}"
    save_with_settings(Image.new("RGB", (8, 8), (10, 20, 30)), path, settings)
    assert read_settings(path) == settings
    if suffix != "png":  # EXIF ImageDescription holds the prompt too, for viewers (ASCII: other letters as ?)
        with Image.open(path) as image:
            assert image.getexif()[0x010E].startswith("caf")
