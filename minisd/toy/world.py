"""The toy world: scenes of one or two flat shapes on a plain or lightly textured background, drawn at 64x64
px.

A scene is data (`Scene`): what its caption states (`Attributes`: colour, shape and size of each item, plus a
position for one item or a relation for two) and how it is drawn (centres, extents, background, texture).
Everything follows from one numpy Generator, so a scene is a pure function of the key that seeds it. The
vocabulary is chosen so that a pixel rule can judge it after a lossy autoencoder blurs it
(minisd.toy.checker): six colours far apart in RGB, backgrounds that are muted and at least 100 RGB units from
every one of them, five shapes that stay apart when blurred, and sizes and positions with wide gaps between
their classes.
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # px, the rendered image's side
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: the coverage of each pixel, i.e. antialiasing

PALETTE = {  # shape colours; the closest pair (green/blue) is ~160 RGB units apart
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {  # muted tones, each >= 100 RGB units from every palette colour (tests/test_toy.py asserts it)
    "grey": (128, 128, 128),
    "sand": (180, 165, 135),
    "slate": (95, 110, 125),
    "sage": (135, 150, 125),
    "mauve": (150, 120, 135),
}
TEXTURES = ("plain", "noise", "stripes")
# RGB units: light enough that background pixels stay nearest their tone
NOISE_STD, STRIPE_AMPLITUDE = 6.0, 10.0

SHAPES = ("circle", "square", "triangle", "star", "cross")
PAIRS = tuple((colour, shape) for colour in PALETTE for shape in SHAPES)  # the 30 colour+shape combinations
# px, a shape's box side; the checker splits them at 19
EXTENTS = {"small": (12.0, 16.0), "large": (22.0, 27.0)}
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("above", "left of")  # canonical; "below" and "right of" are these with the items swapped
MARGIN = 3.0  # px between a shape's box and the image edge, so the border shows only background
# px, the least offset of a shape placed left/right/top/bottom (the checker's boundary is 8)
SIDE_OFFSET = 14.0
JITTER = 3.0  # px, the largest offset across the stated direction (and from the centre for "center")
# inner/outer radius: fatter than a pentagram's 0.38, so small stars keep their points when blurred
STAR_INNER = 0.5


@dataclass(frozen=True)
class Item:
    """What a caption states about one shape."""
    colour: str
    shape: str
    size: str | None  # "small" | "large"; None: a caption that does not say (the world always does)


@dataclass(frozen=True)
class Attributes:
    """What a caption states, and all the checker judges. Two items have distinct colours and are ordered as
    their relation reads: items[0] is above / left of items[1]."""
    items: tuple[Item, ...]
    position: str | None = None  # one item: one of POSITIONS
    relation: str | None = None  # two items: one of RELATIONS


@dataclass(frozen=True)
class Scene:
    """Attributes plus how they are drawn; `render` turns it into pixels."""
    attributes: Attributes
    centres: tuple[tuple[float, float], ...]  # px (x, y) of each item's bounding box, y down
    extents: tuple[float, ...]  # px, each item's box side
    background: str  # a key of BACKGROUNDS
    texture: str  # one of TEXTURES
    texture_seed: int  # seeds the noise, or the stripes' period, angle and phase


def sample_scene(rng: np.random.Generator, avoid: frozenset = frozenset(),
                 need: frozenset = frozenset()) -> Scene:
    """A random scene. Its colour+shape pairs avoid `avoid`; with `need`, one item is one of those pairs and
    any other item may be any pair (the held-out split: combinations the training split never shows)."""
    count = int(rng.integers(1, 3))
    free = [p for p in PAIRS if p not in avoid]
    pools = [sorted(need) or free] + [PAIRS if need else free] * (count - 1)
    pairs = []
    for pool in pools:
        # two items never share a colour
        pool = [p for p in pool if p[0] not in {colour for colour, _ in pairs}]
        pairs.append(pool[rng.integers(len(pool))])
    pairs = [pairs[i] for i in rng.permutation(count)]  # the needed pair is not always the first item
    sizes = [("small", "large")[rng.integers(2)] for _ in pairs]
    extents = [float(rng.uniform(*EXTENTS[size])) for size in sizes]
    items = tuple(Item(colour, shape, size) for (colour, shape), size in zip(pairs, sizes))
    if count == 1:
        position = POSITIONS[rng.integers(len(POSITIONS))]
        attributes, centres = Attributes(items, position=position), (place_one(rng, position, extents[0]),)
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        attributes, centres = Attributes(items, relation=relation), place_two(rng, relation, *extents)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    return Scene(attributes, centres, tuple(extents), background, texture, int(rng.integers(2**31)))


def place_one(rng: np.random.Generator, position: str, extent: float) -> tuple[float, float]:
    """A centre for one shape at `position`: at least SIDE_OFFSET px from the image centre along its
    direction, within JITTER across it, and inside the margin."""
    centre, reach = SIZE / 2, SIZE / 2 - MARGIN - extent / 2  # the farthest a centre may move from the middle
    along, across = float(rng.uniform(SIDE_OFFSET, reach)), float(rng.uniform(-JITTER, JITTER))
    dx, dy = {"left": (-along, across), "right": (along, across), "top": (across, -along),
              "bottom": (across, along), "center": (across, float(rng.uniform(-JITTER, JITTER)))}[position]
    return centre + dx, centre + dy


def place_two(rng: np.random.Generator, relation: str, first: float,
              second: float) -> tuple[tuple[float, float], ...]:
    """Centres for two shapes, the first above / left of the second: along the relation they are separated by
    a gap of at least 3 px, across it they share a line within JITTER. Laid out on (along, across) axes, then
    mapped."""
    gap = float(rng.uniform(3.0, SIZE - 2 * MARGIN - first - second))  # two large shapes: 3..4 px
    start = float(rng.uniform(MARGIN, SIZE - MARGIN - (first + gap + second)))
    along = (start + first / 2, start + first + gap + second / 2)
    half = max(first, second) / 2
    line = float(rng.uniform(MARGIN + half + JITTER, SIZE - MARGIN - half - JITTER))
    across = [line + float(rng.uniform(-JITTER, JITTER)) for _ in range(2)]
    if relation == "above":
        return tuple(zip(across, along))
    return tuple(zip(along, across))


def outline(shape: str, x: float, y: float, extent: float) -> list[tuple[float, float]]:
    """The polygon of a triangle, star or cross whose bounding box is `extent` px wide or tall, centred on (x,
    y)."""
    r = extent / 2
    if shape == "triangle":  # pointing up, base and height both `extent`: it fills half its box
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "cross":  # a plus sign with arms a third of its width: it fills 5/9 of its box
        a = extent / 6
        corners = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r)]
        return [(x + u, y + v) for u, v in corners] + [(x - u, y - v) for u, v in corners]
    # star: five points up, radii r and STAR_INNER * r; shifted so that its bounding box is centred on (x, y)
    points = [(r * (1 if k % 2 == 0 else STAR_INNER) * math.cos(math.pi * (k / 5 - 0.5)),
               r * (1 if k % 2 == 0 else STAR_INNER) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)]
    shift = (max(v for _, v in points) + min(v for _, v in points)) / 2
    return [(x + u, y + v - shift) for u, v in points]


def coverage(shape: str, x: float, y: float, extent: float) -> np.ndarray:
    """[SIZE, SIZE] in [0, 1]: the fraction of each pixel that the shape covers (pixel i spans [i, i + 1))."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    box = [(x - extent / 2) * s, (y - extent / 2) * s, (x + extent / 2) * s - 1, (y + extent / 2) * s - 1]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([(u * s, v * s) for u, v in outline(shape, x, y, extent)], fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255


def background(scene: Scene) -> np.ndarray:
    """[SIZE, SIZE, 3] float RGB: the scene's tone, with grey noise or sine stripes (the same offset in R, G,
    B)."""
    rng = np.random.default_rng(scene.texture_seed)
    tone = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.texture == "noise":
        offset = rng.normal(0.0, NOISE_STD, (SIZE, SIZE))
    elif scene.texture == "stripes":
        period, angle, phase = (rng.uniform(6.0, 12.0), rng.choice([0.0, 45.0, 90.0, 135.0]),
                                rng.uniform(0, 2 * math.pi))
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        along = x * math.cos(math.radians(angle)) + y * math.sin(math.radians(angle))
        offset = STRIPE_AMPLITUDE * np.sin(2 * math.pi * along / period + phase)
    else:
        offset = np.zeros((SIZE, SIZE))
    return tone + offset[..., None].astype(np.float32)


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image: each shape alpha-blended over the background by its coverage."""
    pixels = background(scene)
    for item, (x, y), extent in zip(scene.attributes.items, scene.centres, scene.extents):
        alpha = coverage(item.shape, x, y, extent)[..., None]
        pixels = pixels * (1 - alpha) + np.array(PALETTE[item.colour], dtype=np.float32) * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
