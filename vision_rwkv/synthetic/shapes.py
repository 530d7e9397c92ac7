"""The synthetic "shapes" data set: coloured circles, squares and triangles, captioned by a tiny grammar.

Every image holds 1 to 3 shapes on a light background. A shape has a size (small or large), a colour,
a kind and a place. Captions name every shape and say where it is, in a handful of regular phrasings:

    1 shape:  "a large green triangle in the top left"
    2 shapes: "a small red circle to the left of a large blue square"
    3 shapes: "a small red circle, a large blue square and a small green triangle from left to right"

A trained model can then be scored exactly (`score_caption`), which a free-form caption set cannot give.
Everything is deterministic given the random.Random passed in.

Only 324 one-shape and 1,260 two-shape captions exist, so a test set drawn like the training set mostly
tests recall. A Holdout keeps some compositions out of training scenes (COMPOSITIONAL: three
(colour, kind) pairs anywhere, and three (kind, place) pairs of lone shapes, the only scenes whose
captions name a place), so that a test scene showing one measures whether the model sees or remembers.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {  # far apart in hue, and all clearly darker or more saturated than the background
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (135, 55, 185),
    "orange": (245, 125, 15),
}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.2, "large": 0.4}  # side of the shape's box, as a fraction of the image side
BACKGROUND = (242, 242, 236)

# A lone shape's place: the centre of a 3x3 grid cell; the names read row, then column.
ROWS = {"top": 0.25, "middle": 0.5, "bottom": 0.75}
COLUMNS = {"left": 0.25, "center": 0.5, "right": 0.75}
JITTER = 0.04  # small enough that a centre never leaves its cell's third of the image
MIN_X_GAP = 0.15  # between neighbouring centres, so "left of" is never a close call
SUPERSAMPLE = 4  # draw large and shrink: smooth edges at 64 pixels

_OBJECT_RE = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)})\b")
_PLACE_RE = re.compile(r"\bin the (top left|top center|top right|middle left|center|middle right|"
                       r"bottom left|bottom center|bottom right)\b")


# ---- scenes ----------------------------------------------------------------------------------------


def place_name(row: str, column: str) -> str:
    """Grid cell name used in captions: "top left", "middle right", "center", "bottom center"..."""
    if row == "middle" and column == "center":
        return "center"
    if row == "middle":
        return f"middle {column}"
    return f"{row} {column}"


@dataclass(frozen=True)
class Holdout:
    """Compositions kept out of training scenes: (colour, kind) pairs in any scene, and (kind, place) pairs
    of lone shapes."""

    colour_kind: frozenset = field(default_factory=frozenset)
    kind_place: frozenset = field(default_factory=frozenset)

    def shown(self, objects: list[dict]) -> list[str]:
        """The held-out compositions a scene shows, as readable names ("green triangle", "circle in the top left")."""
        found = [f"{o['colour']} {o['kind']}" for o in objects if (o["colour"], o["kind"]) in self.colour_kind]
        if len(objects) == 1 and (objects[0]["kind"], objects[0]["position"]) in self.kind_place:
            found.append(f"{objects[0]['kind']} in the {objects[0]['position']}")
        return found


COMPOSITIONAL = Holdout(
    colour_kind=frozenset({("green", "triangle"), ("purple", "circle"), ("orange", "square")}),
    kind_place=frozenset({("circle", "top left"), ("square", "center"), ("triangle", "bottom right")}),
)
HOLDOUTS = {"standard": Holdout(), "compositional": COMPOSITIONAL}


def sample_objects(rng: random.Random, holdout: Holdout | None = None) -> list[dict]:
    """A scene: 1-3 distinct shapes that do not touch, sorted left to right; with a holdout, one that shows
    none of its compositions (scenes are drawn again from the same stream until one does).

    Each object: kind, colour, size, x, y (centre, as fractions of the image side), position (grid cell).
    """
    while True:
        n = rng.choice((1, 2, 3))
        while True:
            looks = _sample_looks(rng, n)
            placed = _place_one(rng, looks[0]) if n == 1 else _place_many(rng, looks)
            if placed is not None:
                break
        objects = sorted(placed, key=lambda o: o["x"])
        if holdout is None or not holdout.shown(objects):
            return objects


def _sample_looks(rng: random.Random, n: int) -> list[dict]:
    # Distinct (size, colour, kind) triples, so every shape in a caption names exactly one thing.
    looks: list[tuple[str, str, str]] = []
    while len(looks) < n:
        look = (rng.choice(list(SIZES)), rng.choice(list(COLOURS)), rng.choice(KINDS))
        if look not in looks:
            looks.append(look)
    return [{"size": s, "colour": c, "kind": k} for s, c, k in looks]


def _place_one(rng: random.Random, look: dict) -> list[dict]:
    row, column = rng.choice(list(ROWS)), rng.choice(list(COLUMNS))
    half = SIZES[look["size"]] / 2
    x = _clamp(COLUMNS[column] + rng.uniform(-JITTER, JITTER), half)
    y = _clamp(ROWS[row] + rng.uniform(-JITTER, JITTER), half)
    return [dict(look, x=round(x, 4), y=round(y, 4), position=place_name(row, column))]


def _place_many(rng: random.Random, looks: list[dict], tries: int = 200) -> list[dict] | None:
    """Uniform centres, redrawn until no boxes touch and neighbours are MIN_X_GAP apart; None if unlucky."""
    for _ in range(tries):
        placed = []
        for look in looks:
            half = SIZES[look["size"]] / 2
            x, y = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
            placed.append(dict(look, x=round(x, 4), y=round(y, 4)))
        if _separated(placed):
            for o in placed:
                o["position"] = place_name(_third(o["y"], ROWS), _third(o["x"], COLUMNS))
            return placed
    return None


def _separated(objects: list[dict], margin: float = 0.03) -> bool:
    xs = sorted(o["x"] for o in objects)
    if any(b - a < MIN_X_GAP for a, b in zip(xs, xs[1:])):
        return False
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            reach = (SIZES[a["size"]] + SIZES[b["size"]]) / 2 + margin
            if abs(a["x"] - b["x"]) < reach and abs(a["y"] - b["y"]) < reach:
                return False
    return True


def _clamp(centre: float, half: float) -> float:
    return min(max(centre, half), 1 - half)


def _third(v: float, names: dict[str, float]) -> str:
    return list(names)[min(int(v * 3), 2)]


# ---- drawing ---------------------------------------------------------------------------------------


def render(objects: list[dict], image_size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image of image_size x image_size pixels."""
    big = image_size * SUPERSAMPLE
    im = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for o in objects:
        half = SIZES[o["size"]] * big / 2
        cx, cy = o["x"] * big, o["y"] * big
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = COLOURS[o["colour"]]
        if o["kind"] == "circle":
            draw.ellipse(box, fill=colour)
        elif o["kind"] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return im.resize((image_size, image_size), Image.Resampling.BOX)


# ---- captions --------------------------------------------------------------------------------------


def describe(o: dict) -> str:
    return f"a {o['size']} {o['colour']} {o['kind']}"


def make_captions(objects: list[dict]) -> list[str]:
    """Five phrasings of the same scene (objects sorted left to right), each naming every attribute."""
    names = [describe(o) for o in sorted(objects, key=lambda o: o["x"])]
    if len(names) == 1:
        a, where = names[0], f"in the {objects[0]['position']}"
        return [f"{a} {where}", f"there is {a} {where}", f"{a} is {where}", f"{where} there is {a}",
                f"{where} is {a}"]
    if len(names) == 2:
        a, b = names
        return [f"{a} to the left of {b}", f"{b} to the right of {a}", f"{a} and {b} from left to right",
                f"{b} and {a} from right to left", f"there is {a} to the left of {b}"]
    a, b, c = names
    return [f"{a}, {b} and {c} from left to right", f"{c}, {b} and {a} from right to left",
            f"{a} on the left, {b} in the middle and {c} on the right",
            f"{c} on the right, {b} in the middle and {a} on the left",
            f"there are {a}, {b} and {c} from left to right"]


def generate_example(rng: random.Random, image_size: int = 64) -> tuple[Image.Image, list[str], list[dict]]:
    """One image, its reference captions and its objects (sorted left to right)."""
    objects = sample_objects(rng)
    return render(objects, image_size), make_captions(objects), objects


# ---- reading captions back -------------------------------------------------------------------------


def parse_caption(text: str) -> list[tuple[str, str, str]]:
    """Every "<size> <colour> <kind>" named in a caption, as (size, colour, kind), in reading order."""
    return [m.groups() for m in _OBJECT_RE.finditer(text.lower())]


def parse_layout(text: str) -> list[tuple[str, str, str]] | str | None:
    """What a caption claims about place: the objects from left to right, or a lone object's grid cell.

    Returns a list (several objects, left to right), a cell name (one object), or None when the caption
    states no place this grammar knows.
    """
    text = text.lower()
    found = parse_caption(text)
    if len(found) == 1:
        place = _PLACE_RE.search(_OBJECT_RE.sub("", text))
        return place.group(1) if place else None
    if len(found) == 2 and " to the left of " in text:
        return found
    if len(found) == 2 and " to the right of " in text:
        return found[::-1]
    if " from left to right" in text:
        return found
    if " from right to left" in text:
        return found[::-1]
    slots = _slotted(text)
    return slots if slots and len(slots) == len(found) else None


def _slotted(text: str) -> list[tuple[str, str, str]] | None:
    # "X on the left, Y in the middle and Z on the right", in any order of mention.
    slot_order = {"on the left": 0, "in the middle": 1, "on the right": 2}
    pattern = re.compile(rf"{_OBJECT_RE.pattern} ({'|'.join(slot_order)})")
    hits = [(slot_order[m.group(4)], m.groups()[:3]) for m in pattern.finditer(text)]
    if sorted(s for s, _ in hits) != list(range(len(hits))):
        return None
    return [obj for _, obj in sorted(hits)]


def score_caption(caption: str, objects: list[dict]) -> dict:
    """exact: the caption names the same shapes and places them right; objects_f1: overlap of shapes named."""
    truth = [(o["size"], o["colour"], o["kind"]) for o in sorted(objects, key=lambda o: o["x"])]
    said = parse_caption(caption)
    hits = sum((Counter(said) & Counter(truth)).values())
    precision = hits / len(said) if said else 0.0
    recall = hits / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    same_objects = Counter(said) == Counter(truth)
    layout = parse_layout(caption)
    expected = objects[0]["position"] if len(objects) == 1 else truth
    return {"exact": bool(same_objects and layout == expected), "objects_f1": f1}
