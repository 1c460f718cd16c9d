"""Small image helpers shared by sample.py, train.py and evaluate.py: RGB conversion of any image mode, a
grid, and the settings a generated image carries (PNG text chunks, or EXIF for JPEG and WebP)."""

import json
import math

import numpy as np
from PIL import Image, PngImagePlugin

# what sample.py writes its images as; each keeps the generation settings (save_with_settings)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# EXIF tags: ImageDescription, UserComment; its IFD
DESCRIPTION, USER_COMMENT, EXIF_IFD = 0x010E, 0x9286, 0x8769


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode, by the range its pixels really have.

    PIL's convert("RGB") clips 16- and 32-bit pixels to 0..255, so a 16-bit grayscale PNG (mode I;16 or I)
    turns white: integer modes are scaled from 0..65535 (the 16-bit range PNG and TIFF store; PIL opens them
    as I;16 or I), float images (F) from 0..1. Transparent pixels (LA, RGBA, PA, P with a transparent colour)
    are put on white, the colour a transparent background shows in a viewer, instead of whatever colour they
    hide.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        scale = 1.0 if image.mode == "F" else 65535.0
        pixels = np.asarray(image, dtype=np.float64) / scale
        gray = Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8), "L")
        return gray.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")  # RGB, L, 1, P, CMYK, YCbCr: PIL converts these by their own range


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size side by side, `cols` per row (default: as square as possible)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % cols) * w, (i // cols) * h))
    return sheet


def save_with_settings(image: Image.Image, path, settings: dict[str, str]) -> None:
    """Save `image` with the settings that made it: PNG text chunks (one per key), or for JPEG and WebP, which
    have no text chunks, EXIF: the prompt as ImageDescription and every setting as JSON in UserComment."""
    suffix = str(path).lower().rpartition(".")[2]
    if suffix == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in settings.items():
            info.add_text(key, str(value))
        image.save(path, pnginfo=info)
        return
    exif = Image.Exif()
    exif[DESCRIPTION] = str(settings.get("prompt", ""))
    # UserComment starts with its character code; ASCII JSON (non-ASCII escaped as \uXXXX) reads back exactly
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"ASCII\0\0\0" + json.dumps(settings).encode("ascii")
    image.save(path, exif=exif)


def read_settings(path) -> dict[str, str]:
    """The settings save_with_settings stored in an image file."""
    with Image.open(path) as image:
        if image.format == "PNG":
            return dict(image.text)
        comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT, b"")
    return json.loads(comment[8:]) if comment else {}
