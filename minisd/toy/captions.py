"""Captions for toy scenes, and their parser: `caption` words a scene's attributes in one of several templates
with synonyms, `parse_caption` reads any of them back to exactly those attributes.

Every caption states each item's size, colour and shape, and the position (one item) or relation (two items),
as the checker judges all of them; a trailing background phrase is optional and is not judged. The parser also
reads an item without its size word ("a red circle", as a user types a prompt): its size is then None, and the
checker does not judge it. Two items read
in either order ("a red circle above a blue square", "a blue square below a red circle"): the parser returns
the canonical relation ("above" or "left of") with the items in its order, the form `Attributes` keeps.
"""

import re

import numpy as np

from minisd.toy.world import PALETTE, Attributes, Item, Scene

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
               "star": ("star",), "cross": ("cross", "plus sign")}
POSITION_WORDS = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "in the centre"),
}
RELATION_WORDS = {  # the second pair of each line swaps the items
    "above": ("above", "over", "on top of"), "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
}
SWAPPED = {"below": "above", "right of": "left of"}
TEXTURE_WORDS = {"plain": ("", "plain "), "noise": ("noisy ", "grainy "), "stripes": ("striped ",)}

ONE = ("a {a} {where}", "there is a {a} {where}", "{a} {where}", "{where}, a {a}",
       "a picture of a {a} {where}")
TWO = ("a {a} {rel} a {b}", "{a} {rel} {b}", "there is a {a} {rel} a {b}", "a picture of a {a} {rel} a {b}",
       "a {a} and a {b}, the {ca} one {rel} the {cb} one", "a {b} and a {a}, the {ca} one {rel} the {cb} one")
BACKDROP = (", {texture}{tone} background", ", on a {texture}{tone} background")


def choose(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def words(rng: np.random.Generator, item: Item) -> str:
    return f"{choose(rng, SIZE_WORDS[item.size])} {item.colour} {choose(rng, SHAPE_WORDS[item.shape])}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of the scene, its template and synonyms drawn from rng; half of them name the background."""
    attributes = scene.attributes
    if attributes.position is not None:
        text = choose(rng, ONE).format(a=words(rng, attributes.items[0]),
                                       where=choose(rng, POSITION_WORDS[attributes.position]))
    else:
        first, second = attributes.items
        relation = attributes.relation
        if rng.random() < 0.5:  # say it the other way round: "B below A", "B right of A"
            relation, first, second = {"above": "below", "left of": "right of"}[relation], second, first
        text = choose(rng, TWO).format(a=words(rng, first), b=words(rng, second), ca=first.colour,
                                       cb=second.colour, rel=choose(rng, RELATION_WORDS[relation]))
    if rng.random() < 0.5:
        text += choose(rng, BACKDROP).format(texture=choose(rng, TEXTURE_WORDS[scene.texture]),
                                             tone=scene.background)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def alternation(table: dict) -> str:
    """A regex group matching any phrase of the table, longest first ("on the left side" before "on the
    left")."""
    phrases = sorted((p for ps in table.values() for p in ps), key=len, reverse=True)
    return "(" + "|".join(re.escape(p) for p in phrases) + ")"


def meaning(table: dict, phrase: str) -> str:
    return next(key for key, phrases in table.items() if phrase in phrases)


ITEM = re.compile(rf"\b(?:{alternation(SIZE_WORDS)} )?{alternation({c: (c,) for c in PALETTE})} "
                  rf"{alternation(SHAPE_WORDS)}\b")
COLOUR = re.compile(rf"\b{alternation({c: (c,) for c in PALETTE})}\b")
POSITION = re.compile(rf"\b{alternation(POSITION_WORDS)}\b")
RELATION = re.compile(rf"\b{alternation(RELATION_WORDS)}\b")


def parse_caption(text: str) -> Attributes:
    """The attributes a caption states; ValueError if it does not follow a template. With two items, the
    relation's subject is the colour named last before the relation phrase and its object the first named
    after it, which reads every template ("a big red circle above a small blue square", "..., the blue one
    under the red one"). An item's size word may be left out: its size is then None."""
    text = text.lower()
    items = [Item(m[2], meaning(SHAPE_WORDS, m[3]), m[1] and meaning(SIZE_WORDS, m[1]))
             for m in ITEM.finditer(text)]
    if len(items) == 1:
        if not (found := POSITION.search(text)):
            raise ValueError(f"no position in {text!r}")
        return Attributes(tuple(items), position=meaning(POSITION_WORDS, found[1]))
    if len(items) != 2 or items[0].colour == items[1].colour:
        raise ValueError(f"expected one item, or two of different colours, in {text!r}")
    if not (found := RELATION.search(text)):
        raise ValueError(f"no relation in {text!r}")
    before = [m[1] for m in COLOUR.finditer(text, 0, found.start())]
    after = [m[1] for m in COLOUR.finditer(text, found.end())]
    by_colour = {item.colour: item for item in items}
    if not before or not after or {before[-1], after[0]} != set(by_colour):
        raise ValueError(f"expected one item's colour on each side of {found[1]!r} in {text!r}")
    relation, first, second = meaning(RELATION_WORDS, found[1]), by_colour[before[-1]], by_colour[after[0]]
    if relation in SWAPPED:
        relation, first, second = SWAPPED[relation], second, first
    return Attributes((first, second), relation=relation)
