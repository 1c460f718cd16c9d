"""Small image helpers shared by sample.py, train.py and evaluate.py."""

import math

from PIL import Image


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size side by side, `cols` per row (default: as square as possible)."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % cols) * w, (i // cols) * h))
    return sheet
