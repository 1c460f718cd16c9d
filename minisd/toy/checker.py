"""A rule-based pixel checker for toy images: does an image show what its caption states? No network, no
training.

1. Background: the median colour of the 2-px border (the world keeps shapes 3 px inside it), so textures and a
   model's off-tone backgrounds are judged against what the image itself shows.
2. Colour by unmixing: each pixel is read as background + alpha * (palette colour - background), alpha fitted
   per colour by least squares (clipped to [0, 1]). The colour with the smallest residual explains the pixel;
   it is that colour's if alpha >= 1/2 and the residual is under MAX_RESIDUAL. A blurred edge is a mix of one
   shape colour and the background, so it is never mistaken for a third colour, as plain nearest-colour would
   do (black over sage lies nearer green than either).
3. Blobs: 8-connected components of each colour's pixels, those under MIN_AREA px being specks. Each colour's
   largest blob is its shape; its alpha map (the blob grown by 2 px, to take in its soft edge) is what is
   measured.
4. Shape by template: each of the five shapes is drawn, as minisd.toy.world draws it, with the blob's alpha
   mass and centroid (both survive blurring), sharp and blurred by TEMPLATE_BLURS; the shape of the template
   that overlaps the blob best (soft IoU) is its shape. Sharp templates alone lose small stars, whose points a
   blur turns into a pentagon nearer a sharp circle than a sharp star. The fitted template also gives the
   blob's extent (for size) and its box centre (for position and relation), which is how the world places
   shapes.
5. Size, position and relation: thresholds half-way between the ranges that minisd.toy.world draws from.
"""

from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from minisd.toy.captions import parse_caption
from minisd.toy.parallel import ordered_map
from minisd.toy.world import PALETTE, SHAPES, SIZE, Attributes, coverage

__all__ = ["Blob", "check", "check_caption", "check_folder", "features", "find_blobs", "parse_caption"]

MAX_RESIDUAL = 60.0  # RGB units off the background-to-colour line; the palette colours are >= 150 apart
MIN_AREA = 15  # px; the smallest shape, a 12 px star, covers ~50
LARGE = 19.0  # px of fitted extent: small shapes are drawn 12-16 px, large ones 22-27
OFF_CENTRE = 8.0  # px; "center" is drawn within 3 px of the middle, the sides at least 14 px away
# Gaussian sigmas, px. Caption accuracy on 1,000 scenes blurred with sigma 1.5 plus noise (std 8): 99.7% with
# these, 96% with (0, 0.7, 1.4, 2.1), 88% with sharp templates only (small stars taken for circles or squares)
TEMPLATE_BLURS = (0.0, 1.0, 2.0)
COLOURS = np.array(list(PALETTE.values()), dtype=np.float32)


@dataclass(frozen=True)
class Blob:
    """One colour's largest region as its best-fitting template sees it, in px (x right, y down)."""
    colour: str
    area: float  # alpha mass, px
    x: float  # centre of the fitted template's bounding box
    y: float
    extent: float  # the fitted template's box side
    matches: tuple[float, ...]  # soft IoU with each of SHAPES' templates, the best over TEMPLATE_BLURS

    @property
    def shape(self) -> str:
        return SHAPES[int(np.argmax(self.matches))]

    @property
    def size(self) -> str:
        return "large" if self.extent >= LARGE else "small"

    @property
    def position(self) -> str:
        dx, dy = self.x - SIZE / 2, self.y - SIZE / 2
        if max(abs(dx), abs(dy)) < OFF_CENTRE:
            return "center"
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


def pixels(image) -> np.ndarray:
    """[SIZE, SIZE, 3] float32 RGB from a PIL image or an [H, W, 3] array of 0..255; other sizes are
    area-resized."""
    if isinstance(image, np.ndarray) and image.shape == (SIZE, SIZE, 3):
        return image.astype(np.float32)
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def background_tone(x: np.ndarray) -> np.ndarray:
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def unmix(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 2: [len(PALETTE), SIZE, SIZE] alpha of each pixel's best colour (0 for the other colours), and
    [len(PALETTE), SIZE, SIZE] bool, the pixels that colour explains."""
    tone = background_tone(x)
    direction = COLOURS - tone  # [colours, 3]
    alpha = np.clip((x - tone) @ direction.T / (direction**2).sum(1), 0, 1)  # [SIZE, SIZE, colours]
    residual = np.linalg.norm((x - tone)[:, :, None] - alpha[..., None] * direction, axis=-1)
    best = residual.argmin(-1)
    alpha = np.where(np.arange(len(COLOURS)) == best[..., None], alpha, 0).transpose(2, 0, 1)
    return alpha, (alpha >= 0.5) & (residual.min(-1) < MAX_RESIDUAL)


@cache
def ideal(shape: str) -> tuple[float, float, float]:
    """A shape's area / extent**2 and its centroid's offset from its box centre / extent, measured on a 40 px
    drawing (the star's and the triangle's centroids lie below their box centre)."""
    alpha = coverage(shape, SIZE / 2, SIZE / 2, 40.0)
    mass, cx, cy = moments(alpha)
    return mass / 40.0**2, (cx - SIZE / 2) / 40.0, (cy - SIZE / 2) / 40.0


def moments(alpha: np.ndarray) -> tuple[float, float, float]:
    """Mass and centroid (x, y) of an alpha map; pixel i's centre is at i + 0.5."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    mass = float(alpha.sum())
    return mass, float((alpha * x).sum() / mass), float((alpha * y).sum() / mass)


def fit(colour: str, alpha: np.ndarray) -> Blob:
    """Step 4: each template scaled to the blob's mass and moved to its centroid; the blob with every
    overlap."""
    mass, cx, cy = moments(alpha)
    matches, placed = [], []
    for shape in SHAPES:
        fill, dx, dy = ideal(shape)
        extent = (mass / fill) ** 0.5
        x, y = cx - dx * extent, cy - dy * extent
        sharp = coverage(shape, x, y, extent)
        templates = [ndimage.gaussian_filter(sharp, sigma) if sigma else sharp for sigma in TEMPLATE_BLURS]
        matches.append(max(float(np.minimum(alpha, t).sum() / np.maximum(alpha, t).sum()) for t in templates))
        placed.append((x, y, extent))
    x, y, extent = placed[int(np.argmax(matches))]
    return Blob(colour, mass, x, y, extent, tuple(matches))


def find_blobs(image) -> tuple[dict[str, Blob], int]:
    """Each palette colour's largest blob, and the number of blobs of any colour (MIN_AREA px or more)."""
    alpha, explained = unmix(pixels(image))
    others = explained.any(0)
    blobs, count = {}, 0
    for c, colour in enumerate(PALETTE):
        labels, n = ndimage.label(explained[c], structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        count += int((areas >= MIN_AREA).sum())
        if n and areas.max() >= MIN_AREA:
            grown = ndimage.binary_dilation(labels == areas.argmax() + 1, iterations=2)
            grown &= ~(others & ~explained[c])  # but not into another colour's pixels
            blobs[colour] = fit(colour, np.where(grown, alpha[c], 0.0))
    return blobs, count


def check(image, attributes: Attributes) -> dict[str, bool]:
    """Per-attribute verdicts: colour (each stated colour has a blob), shape, size (of the items whose size
    is stated; no verdict when none is), position or relation, count (as many blobs as items: nothing
    missing, nothing extra), and caption_correct (all of them). An item whose colour is missing fails every
    attribute."""
    blobs, count = find_blobs(image)
    found = [blobs.get(item.colour) for item in attributes.items]
    verdict = {
        "colour": all(found),
        "shape": all(b is not None and b.shape == item.shape for b, item in zip(found, attributes.items)),
        "count": count == len(attributes.items),
    }
    sized = [(b, item) for b, item in zip(found, attributes.items) if item.size is not None]
    if sized:  # a caption without size words is not judged on size
        verdict["size"] = all(b is not None and b.size == item.size for b, item in sized)
    if attributes.position is not None:
        verdict["position"] = found[0] is not None and found[0].position == attributes.position
    else:
        verdict["relation"] = all(found) and relation(*found) == attributes.relation
    verdict["caption_correct"] = all(verdict.values())
    return verdict


def relation(first: Blob, second: Blob) -> str:
    """How `first` stands to `second` along the axis that separates them more: above/below, left of/right
    of."""
    dx, dy = second.x - first.x, second.y - first.y
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def check_caption(image, text: str) -> dict[str, bool]:
    return check(image, parse_caption(text))


def features(image) -> np.ndarray:
    """[len(PALETTE) * 9 + 4] float32 per image, for an FID-like distance between image sets: per palette
    colour (in PALETTE's order) its blob's area / SIZE**2, x, y and extent / SIZE and its five template
    matches, zeros when absent; then the background tone / 255 and the fraction of pixels that no colour
    explains beyond the background."""
    x = pixels(image)
    blobs, _ = find_blobs(x)
    rows = [[b.area / SIZE**2, b.x / SIZE, b.y / SIZE, b.extent / SIZE,
             *b.matches] if (b := blobs.get(colour))
            else [0.0] * 9 for colour in PALETTE]
    tone = background_tone(x)
    _, explained = unmix(x)
    stray = (np.linalg.norm(x - tone, axis=-1) > MAX_RESIDUAL) & ~explained.any(0)
    return np.array([v for row in rows for v in row] + list(tone / 255) + [stray.mean()], dtype=np.float32)


def check_file(folder: Path, row: tuple[str, str]) -> dict[str, bool]:
    file_name, text = row
    with Image.open(folder / file_name) as image:
        return check_caption(image, text)


def check_folder(folder: str | Path, rows: list[tuple[str, str]],
                 workers: int = 1) -> dict[str, tuple[int, int]]:
    """(right, judged) per attribute over the (file_name, text) rows, images read from `folder`. Position and
    relation are judged only on the captions that state them."""
    totals = {}
    for verdict in ordered_map(partial(check_file, Path(folder)), rows, workers):
        for name, right in verdict.items():
            got, judged = totals.get(name, (0, 0))
            totals[name] = (got + right, judged + 1)
    return totals
