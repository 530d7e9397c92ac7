"""The shapes set: deterministic, captions that parse back to the scene, and a scorer that catches mistakes."""

import random
from collections import Counter

import numpy as np
import pytest

from vision_rwkv.synthetic.shapes import (
    BACKGROUND,
    COLOURS,
    KINDS,
    SIZES,
    generate_example,
    make_captions,
    parse_caption,
    parse_layout,
    render,
    score_caption,
)


def examples(n=300, seed=0, size=64):
    rng = random.Random(seed)
    return [generate_example(rng, size) for _ in range(n)]


@pytest.fixture(scope="module")
def many():
    return examples()


def triples(objects):
    return [(o["size"], o["colour"], o["kind"]) for o in objects]


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = examples(20, seed=5), examples(20, seed=5), examples(20, seed=6)
    for (ia, ca, oa), (ib, cb, ob) in zip(a, b):
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and ca == cb and oa == ob
    assert [x[1] for x in a] != [x[1] for x in c]


def test_scene_statistics(many):
    counts = Counter(len(objects) for _, _, objects in many)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 50
    seen = Counter(t for _, _, objects in many for t in triples(objects))
    assert {s for s, _, _ in seen} == set(SIZES)
    assert {c for _, c, _ in seen} == set(COLOURS)
    assert {k for _, _, k in seen} == set(KINDS)


def test_images_have_the_requested_size_and_show_every_colour(many):
    im, _, objects = many[0]
    assert im.size == (64, 64) and im.mode == "RGB"
    assert generate_example(random.Random(1), 96)[0].size == (96, 96)
    for im, _, objects in many[:40]:
        pixels = np.asarray(im).reshape(-1, 3).astype(int)
        assert (np.abs(pixels - BACKGROUND).sum(1) < 6).mean() > 0.3  # mostly background
        for o in objects:
            distance = np.abs(pixels - COLOURS[o["colour"]]).sum(1)
            assert (distance < 12).sum() >= 20, (o, "colour not drawn")


def test_large_shapes_are_larger(many):
    # Drawn area tracks the stated size: every large shape covers more pixels than any small one.
    areas = {"small": [], "large": []}
    for im, _, objects in many[:80]:
        pixels = np.asarray(im).astype(int)
        for o in objects:
            half = SIZES[o["size"]] * 64 / 2 + 1  # the shape's own box: another may share its colour
            x0, x1 = int(o["x"] * 64 - half), int(o["x"] * 64 + half) + 1
            y0, y1 = int(o["y"] * 64 - half), int(o["y"] * 64 + half) + 1
            box = pixels[max(y0, 0):y1, max(x0, 0):x1]
            areas[o["size"]].append(int((np.abs(box - COLOURS[o["colour"]]).sum(-1) < 40).sum()))
    assert max(areas["small"]) < min(areas["large"])


def test_shapes_do_not_overlap_and_stay_inside(many):
    for _, _, objects in many:
        for o in objects:
            half = SIZES[o["size"]] / 2
            assert half <= o["x"] <= 1 - half and half <= o["y"] <= 1 - half
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                reach = (SIZES[a["size"]] + SIZES[b["size"]]) / 2
                assert abs(a["x"] - b["x"]) >= reach or abs(a["y"] - b["y"]) >= reach
        xs = [o["x"] for o in objects]
        assert xs == sorted(xs)


def test_every_caption_names_every_object_and_scores_exact(many):
    for _, captions, objects in many:
        assert len(captions) >= 4 and len(set(captions)) == len(captions)
        for caption in captions:
            assert caption == caption.lower() and not caption.endswith(".")
            assert Counter(parse_caption(caption)) == Counter(triples(objects)), caption
            assert score_caption(caption, objects) == {"exact": True, "objects_f1": 1.0}, caption


def grid_cell(position):
    if position == "center":
        return 1, 1
    row, column = position.split()
    return {"top": 0, "middle": 1, "bottom": 2}[row], {"left": 0, "center": 1, "right": 2}[column]


def test_lone_shape_position_names_its_third(many):
    lone = [(captions, objects[0]) for _, captions, objects in many if len(objects) == 1]
    assert len({o["position"] for _, o in lone}) == 9
    for captions, o in lone:
        assert grid_cell(o["position"]) == (int(o["y"] * 3), int(o["x"] * 3))
        assert all(parse_layout(c) == o["position"] for c in captions)


def two_shapes():
    objects = [dict(size="small", colour="red", kind="circle", x=0.25, y=0.5, position="middle left"),
               dict(size="large", colour="blue", kind="square", x=0.7, y=0.4, position="middle right")]
    return objects


def test_documented_phrasings():
    objects = two_shapes()
    captions = make_captions(objects)
    assert "a small red circle to the left of a large blue square" in captions
    assert "a large blue square to the right of a small red circle" in captions
    lone = [dict(size="large", colour="green", kind="triangle", x=0.25, y=0.25, position="top left")]
    assert "a large green triangle in the top left" in make_captions(lone)


@pytest.mark.parametrize(
    "caption, exact, f1",
    [
        ("a small red circle to the left of a large blue square", True, 1.0),
        ("a large blue square to the right of a small red circle", True, 1.0),
        ("a large blue square to the left of a small red circle", False, 1.0),  # wrong relation
        ("a small red circle and a large blue square from right to left", False, 1.0),
        ("a small green circle to the left of a large blue square", False, 0.5),  # wrong colour
        ("a large red circle to the left of a large blue square", False, 0.5),  # wrong size
        ("a small red circle", False, 2 / 3),  # one missing
        ("a small red circle to the left of a large blue square to the left of a small red circle", False, 0.8),
        ("two shapes", False, 0.0),
        ("", False, 0.0),
    ],
)
def test_score_caption_catches_mistakes(caption, exact, f1):
    score = score_caption(caption, two_shapes())
    assert score["exact"] is exact
    assert score["objects_f1"] == pytest.approx(f1)


def test_score_caption_checks_a_lone_shapes_place():
    lone = [dict(size="large", colour="green", kind="triangle", x=0.25, y=0.25, position="top left")]
    assert score_caption("a large green triangle in the top left", lone)["exact"]
    assert not score_caption("a large green triangle in the top right", lone)["exact"]
    assert not score_caption("a large green triangle", lone)["exact"]
    assert score_caption("a large green triangle", lone)["objects_f1"] == 1.0


def test_three_shapes_order():
    objects = [dict(size="small", colour="red", kind="circle", x=0.2, y=0.2, position="top left"),
               dict(size="large", colour="blue", kind="square", x=0.5, y=0.7, position="bottom center"),
               dict(size="small", colour="green", kind="triangle", x=0.8, y=0.2, position="top right")]
    for caption in make_captions(objects):
        assert score_caption(caption, objects)["exact"], caption
    swapped = "a large blue square, a small red circle and a small green triangle from left to right"
    assert score_caption(swapped, objects) == {"exact": False, "objects_f1": 1.0}
    slots = "a small green triangle on the right, a small red circle on the left and a large blue square in the middle"
    assert score_caption(slots, objects)["exact"]


def test_render_is_pure():
    objects = two_shapes()
    assert np.array_equal(np.asarray(render(objects, 32)), np.asarray(render(objects, 32)))


def test_a_holdout_keeps_its_compositions_out_and_names_them():
    from vision_rwkv.synthetic.shapes import COMPOSITIONAL, sample_objects

    rng = random.Random(5)
    scenes = [sample_objects(rng, COMPOSITIONAL) for _ in range(400)]
    assert not any(COMPOSITIONAL.shown(s) for s in scenes)
    free = [sample_objects(random.Random(i)) for i in range(400)]
    shown = [COMPOSITIONAL.shown(s) for s in free]
    assert sum(map(bool, shown)) > 40  # a free draw shows them often enough to measure
    lone = {"kind": "circle", "colour": "red", "size": "small", "x": 0.2, "y": 0.2, "position": "top left"}
    assert COMPOSITIONAL.shown([lone]) == ["circle in the top left"]
    assert COMPOSITIONAL.shown([lone, dict(lone, colour="green", kind="triangle", x=0.7)]) == ["green triangle"]
    # the same stream without a holdout gives the scene it always gave (the shipped test images rely on it)
    assert sample_objects(random.Random(7)) == sample_objects(random.Random(7), None)
