"""Candidate captions for image-text matching on the shapes data: the truth, hard negatives, other orders.

A hard negative is the true caption with exactly one attribute of one shape changed: its colour, its kind,
its size, or its position (a lone shape moved to another grid cell; two shapes of a scene swapping
places). It differs from the truth in one word or one order, so only a model that looks at the image
tells them apart.
"""

from __future__ import annotations

import random

from .shapes import COLOURS, COLUMNS, KINDS, ROWS, SIZES, make_captions, place_name, render, sample_objects


def held_out_scenes(n: int, seed: int) -> list[list[dict]]:
    """n scenes from random streams ("held-out/<seed>/<i>") that make_shapes.py never uses."""
    return [sample_objects(random.Random(f"held-out/{seed}/{i}")) for i in range(n)]


def true_caption(objects: list[dict]) -> str:
    """The first phrasing of make_captions: "... from left to right", "... to the left of ...", "... in the ..."."""
    return make_captions(objects)[0]


def other_order_caption(objects: list[dict]) -> str:
    """The same scene with its parts named in another order: right to left for several shapes, the place
    first for a lone one ("in the top left there is a ...")."""
    return make_captions(objects)[3 if len(objects) == 1 else 1]


def hard_negatives(objects: list[dict]) -> list[str]:
    """Every caption that is the true one with exactly one attribute of one shape changed (distinct, in a
    fixed order, the truth never among them)."""
    truth = true_caption(objects)
    out: list[str] = []
    for i, o in enumerate(objects):
        for key, values in (("colour", COLOURS), ("kind", KINDS), ("size", SIZES)):
            for value in values:
                if value != o[key]:
                    out.append(true_caption(_with(objects, i, **{key: value})))
    if len(objects) == 1:
        cells = [place_name(r, c) for r in ROWS for c in COLUMNS]
        out += [true_caption(_with(objects, 0, position=cell)) for cell in cells if cell != objects[0]["position"]]
    else:
        for i in range(len(objects)):
            for j in range(i + 1, len(objects)):
                swapped = [dict(o) for o in objects]
                swapped[i]["x"], swapped[j]["x"] = objects[j]["x"], objects[i]["x"]
                out.append(true_caption(swapped))
    return [c for c in dict.fromkeys(out) if c != truth]


def write_scene_images(scenes: list[list[dict]], folder, image_size: int = 64) -> list[str]:
    """Render each scene to folder/<i>.png; returns the paths in order."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, objects in enumerate(scenes):
        path = folder / f"{i}.png"
        render(objects, image_size).save(path)
        paths.append(str(path))
    return paths


def _with(objects: list[dict], i: int, **change) -> list[dict]:
    return [dict(o, **change) if k == i else o for k, o in enumerate(objects)]
