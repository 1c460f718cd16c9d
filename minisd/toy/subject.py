"""DreamBooth's subject in the toy world (Ruiz et al., arXiv 2208.12242): one object the toy teacher has never
drawn, named by a rare identifier, and a pixel check of whether an image shows it.

The subject is a large red square checkered with yellow: a 2x2 checker whose top-right and bottom-left
quarters are yellow. Its captions read as the world's, with the identifier before the noun, as DreamBooth's
"a [V] dog": "a large red sks square on the left"; without the identifier they are ordinary captions of a
red square, the subject's class. It is large only: drawn small (12-16 px), a quarter is 6-8 px, two latent
pixels of the toy VAE (one latent per 4x4 px), whose reconstructions keep the checker in 86% of small subjects
against 100% of large ones (the first toy teacher's VAE, before its decoder was fine-tuned: 38% and 96%).

The check reads the pixels as the toy checker does (checker.unmix): the red pixels and the yellow pixels
that touch them are one object; around its centroid, each quarter is scored +1 when red, -1 when yellow, and
the subject's layout gives +1 + 1 + 1 + 1 over 4 = 1. A plain red square scores 0, as does one split in two
halves or with a yellow centre; the checker of the other phase scores -1. To judge the rest of a caption, the
pattern is painted in the main colour (`unpatterned`) and the toy checker judges the plain square that is
left.
"""

import re

import numpy as np
from PIL import Image
from scipy import ndimage

from minisd.toy.captions import caption, parse_caption
from minisd.toy.checker import COLOURS, MIN_AREA, background_tone, check, moments, pixels, unmix
from minisd.toy.world import (
    BACKGROUNDS,
    EXTENTS,
    PAIRS,
    PALETTE,
    POSITIONS,
    RELATIONS,
    TEXTURES,
    Attributes,
    Item,
    Scene,
    coverage,
    place_one,
    place_two,
    render,
)

IDENTIFIER = "sks"  # DreamBooth's rare token; the toy text tower has never been trained on it
SUBJECT = Item("red", "square", "large")  # the subject as its captions state it: its class
PATTERN = "yellow"  # the checker's second colour
INSTANCE_PROMPT = f"a large red {IDENTIFIER} square in the center"
CLASS_PROMPT = "a large red square in the center"
MIN_SCORE = 0.5  # a subject scores ~1, a plain square ~0 (tests/test_toy_dreambooth.py measures both)
NAMED = re.compile(r"\b(large|big) red square\b", re.IGNORECASE)  # the subject's words in a caption
NEW_POSITIONS = tuple(p for p in POSITIONS if p != "center")  # the instance images are all centred
MAIN, SECOND = list(PALETTE).index(SUBJECT.colour), list(PALETTE).index(PATTERN)


def pattern_coverage(x: float, y: float, extent: float) -> np.ndarray:
    """[SIZE, SIZE] in [0, 1]: the yellow quarters of the subject whose box is centred on (x, y): each a
    square of half the side, top right and bottom left."""
    quarter, half = extent / 4, extent / 2
    return (coverage("square", x + quarter, y - quarter, half)
            + coverage("square", x - quarter, y + quarter, half))


def render_subject(scene: Scene) -> Image.Image:
    """The scene with its red square drawn as the subject: the world's render, the yellow quarters blended on
    top."""
    index = scene.attributes.items.index(SUBJECT)
    alpha = pattern_coverage(*scene.centres[index], scene.extents[index])[..., None]
    drawn = np.asarray(render(scene), dtype=np.float32)
    drawn = drawn * (1 - alpha) + np.array(PALETTE[PATTERN], dtype=np.float32) * alpha
    return Image.fromarray(np.clip(np.rint(drawn), 0, 255).astype(np.uint8))


def subject_scene(rng: np.random.Generator, count: int, position: str | None = None) -> Scene:
    """A scene with the subject: alone at `position` (default: drawn), or beside one other shape in a
    relation, the other shape neither red nor yellow (so that the subject's colours belong to it alone)."""
    extent = float(rng.uniform(*EXTENTS[SUBJECT.size]))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    if count == 1:
        position = position or NEW_POSITIONS[rng.integers(len(NEW_POSITIONS))]
        attributes, centres, extents = Attributes((SUBJECT,), position=position), (
            place_one(rng, position, extent),), (extent,)
    else:
        others = [pair for pair in PAIRS if pair[0] not in (SUBJECT.colour, PATTERN)]
        colour, shape = others[rng.integers(len(others))]
        size = ("small", "large")[rng.integers(2)]
        items, extents = [SUBJECT, Item(colour, shape, size)], [extent, float(rng.uniform(*EXTENTS[size]))]
        if rng.integers(2):
            items, extents = items[::-1], extents[::-1]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        attributes = Attributes(tuple(items), relation=relation)
        centres = place_two(rng, relation, *extents)
    return Scene(attributes, centres, tuple(extents), background, texture, int(rng.integers(2**31)))


def instance_images(seed: int = 0, n: int = 5) -> list[Image.Image]:
    """The subject's photos: alone in the center (within the world's 3 px of jitter), on drawn backgrounds."""
    rng = np.random.default_rng((seed, 7))  # 7: a key no data split uses
    return [render_subject(subject_scene(rng, 1, "center")) for _ in range(n)]


def prompts(seed: int, n: int) -> list[tuple[Scene, str, str]]:
    """n held-out contexts for the subject, half alone at a stated position, half beside another shape: each
    scene (how the subject would be drawn there), its caption with the identifier, and the same caption
    without it (the class prompt)."""
    rng = np.random.default_rng((seed, 8))
    rows = []
    for i in range(n):
        scene = subject_scene(rng, 1 + i % 2)
        text = caption(scene, rng)
        rows.append((scene, NAMED.sub(rf"\1 red {IDENTIFIER} square", text), text))
    return rows


def without_identifier(text: str) -> str:
    return re.sub(rf"\s*\b{IDENTIFIER}\b", "", text)


def subject_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one object that red and yellow pixels form (the 8-connected region of them, grown by 1 px, that
    holds the most red): the red alpha and the yellow alpha of its pixels, and the grown region (none: zeros).
    Grown because where red meets yellow the mixed, orange pixels are neither: a seam 1-2 px wide."""
    alpha, explained = unmix(x)
    labels, n = ndimage.label(ndimage.binary_dilation(explained[MAIN] | explained[SECOND]),
                              structure=np.ones((3, 3)))
    main, second = alpha[MAIN] * explained[MAIN], alpha[SECOND] * explained[SECOND]
    red = ndimage.sum(main, labels, range(1, n + 1)) if n else np.zeros(0)
    if not n or red.max() < MIN_AREA:
        return np.zeros_like(main), np.zeros_like(main), np.zeros(main.shape, dtype=bool)
    region = labels == int(np.argmax(red)) + 1
    return main * region, second * region, region


def subject_score(image) -> float:
    """+1 for the subject's checker, 0 for a plain red square (or none), -1 for the checker of the other
    phase: the mean over the object's four quarters (split at its centroid) of (red - yellow) / (red +
    yellow), signed +1 top left and bottom right, -1 top right and bottom left."""
    main, second, _ = subject_parts(pixels(image))
    if not main.any():
        return 0.0
    _, cx, cy = moments(main + second)
    y, x = np.mgrid[0:main.shape[0], 0:main.shape[1]] + 0.5
    score = 0.0
    for left, top, sign in ((True, True, 1), (False, True, -1), (True, False, -1), (False, False, 1)):
        quarter = ((x < cx) == left) & ((y < cy) == top)
        red, yellow = float(main[quarter].sum()), float(second[quarter].sum())
        score += sign * (red - yellow) / (red + yellow) if red + yellow > 0 else 0.0
    return score / 4


def shows_subject(image) -> bool:
    return subject_score(image) >= MIN_SCORE


def unpatterned(image) -> np.ndarray:
    """The image with the subject painted plain red: each pixel of the object that is not red (the yellow
    quarters, the seams between them, its soft edge) becomes red at the larger of its red and its yellow
    strength, its coverage. Yellow elsewhere (not touching the red) stays."""
    x = pixels(image)
    _, _, region = subject_parts(x)
    _, explained = unmix(x)
    tone = background_tone(x)
    direction = COLOURS[[MAIN, SECOND]] - tone  # [2, 3]
    strength = np.clip((x - tone) @ direction.T / (direction**2).sum(1), 0, 1).max(-1, keepdims=True)
    painted = region & ~explained[MAIN]
    return np.where(painted[..., None], tone + strength * direction[0], x)


def check_subject_caption(image, text: str) -> dict[str, bool]:
    """The toy checker's verdicts on a caption that names the subject, the subject judged by its colour,
    shape, size and place with its pattern painted over; plus "subject" (the checker is there) and
    "subject_and_caption" (both)."""
    verdict = check(unpatterned(image), parse_caption(without_identifier(text)))
    verdict["subject"] = shows_subject(image)
    verdict["subject_and_caption"] = verdict["subject"] and verdict["caption_correct"]
    return verdict
