"""The grounding score on hand-made attention maps: in the box = 1, uniform = the box's share, outside = 0."""
import numpy as np
import pytest
import torch

import shapes
import utils
from grounding import cell_coverage, grounding_scores, image_grounding

GRID = 4  # cells of a quarter of the image side
RED_CIRCLE = {"words": ["small", "red", "circle"], "box": [0.25, 0.5, 0.75, 1.0]}  # rows 2-3, columns 1-2
BLUE_SQUARE = {"words": ["large", "blue", "square"], "box": [0.0, 0.0, 0.25, 0.25]}  # cell (0, 0)
CAPTION = ["a", "small", "red", "circle", "<end>"]


def maps(*grids):
    """(T, G*G) attention from (G, G) weight grids, each normalised to sum 1."""
    return np.stack([np.asarray(grid, dtype=float).reshape(-1) / np.sum(grid) for grid in grids])


def inside(box):
    """A (G, G) grid with weight 1 on the cells wholly inside an aligned box, 0 elsewhere."""
    x0, y0, x1, y1 = (round(v * GRID) for v in box)
    grid = np.zeros((GRID, GRID))
    grid[y0:y1, x0:x1] = 1
    return grid


UNIFORM = np.ones((GRID, GRID))


def scores_of(*word_grids, objects=(RED_CIRCLE,), words=CAPTION):
    """Scores of one image whose caption's words look at the given grids (uniform for the others)."""
    grids = list(word_grids) + [UNIFORM] * (len(words) - len(word_grids))
    return grounding_scores([words], [maps(*grids)], [list(objects)], GRID)


def test_all_mass_in_the_box_scores_one():
    in_box = inside(RED_CIRCLE["box"])
    scores = scores_of(UNIFORM, UNIFORM, in_box, in_box)  # "red" and "circle" look inside the circle's box
    assert scores["object_words"] == 2  # "red" and "circle"; "small" (a size) and "a", "<end>" are not counted
    assert scores["peak_in_box"] == 1 and scores["mass_in_box"] == pytest.approx(1)
    assert scores["uniform_mass_in_box"] == pytest.approx(0.25)  # the box covers a quarter of the image


def test_uniform_attention_scores_the_boxes_share():
    scores = scores_of()
    assert scores["mass_in_box"] == pytest.approx(0.25) and scores["peak_in_box"] == pytest.approx(0.25)
    assert scores["uniform_mass_in_box"] == pytest.approx(0.25)


def test_all_mass_outside_scores_zero():
    outside = 1 - inside(RED_CIRCLE["box"])
    assert scores_of(UNIFORM, UNIFORM, outside, outside)["mass_in_box"] == 0
    assert scores_of(UNIFORM, UNIFORM, outside, outside)["peak_in_box"] == 0


def test_a_peak_cell_counts_by_its_area_inside_the_box():
    half = {"words": ["small", "red", "circle"], "box": [0.0, 0.0, 0.125, 0.25]}  # left half of cell (0, 0)
    grid = np.full((GRID, GRID), 0.01)
    grid[0, 0] = 1.0
    record = image_grounding(["red"], maps(grid), [half], GRID)
    assert record["peak_in_box"] == [0.5]
    assert record["mass_in_box"] == pytest.approx([0.5 * 1.0 / (1.0 + 0.15)])
    assert record["uniform_mass_in_box"] == pytest.approx([0.125 * 0.25])


def test_words_that_name_nothing_in_the_scene_are_not_counted():
    words = ["a", "blue", "square", "and", "a", "red", "circle"]  # no blue square in this scene
    scores = scores_of(*[UNIFORM] * 5, inside(RED_CIRCLE["box"]), inside(RED_CIRCLE["box"]), words=words)
    assert scores["object_words"] == 2 and scores["mass_in_box"] == pytest.approx(1)
    nothing = scores_of(words=["a", "blue", "square"])
    assert nothing["object_words"] == 0 and nothing["mass_in_box"] is None and nothing["peak_in_box"] is None


def test_a_colour_two_objects_share_refers_to_both_boxes():
    red_square = {"words": ["large", "red", "square"], "box": [0.0, 0.0, 0.25, 0.25]}
    on_square = inside(red_square["box"])
    record = image_grounding(["red", "circle"], maps(on_square, on_square), [RED_CIRCLE, red_square], GRID)
    assert record["positions"] == [0, 1]
    assert record["mass_in_box"] == pytest.approx([1.0, 0.0])  # "red": either red object; "circle": not the square
    assert record["uniform_mass_in_box"] == pytest.approx([0.25 + 1 / 16, 0.25])


def test_words_are_pooled_over_images_and_images_without_boxes_skipped():
    captions = [["red", "circle"], ["blue"], ["red"]]
    attentions = [maps(inside(RED_CIRCLE["box"]), inside(RED_CIRCLE["box"])),
                  torch.tensor(maps(inside(RED_CIRCLE["box"]))),  # looks away from the blue square
                  maps(UNIFORM)]
    scores = grounding_scores(captions, attentions, [[RED_CIRCLE], [BLUE_SQUARE], None], GRID)
    assert scores["object_words"] == 3
    assert scores["mass_in_box"] == pytest.approx(2 / 3) and scores["peak_in_box"] == pytest.approx(2 / 3)
    assert scores["uniform_mass_in_box"] == pytest.approx((0.25 + 0.25 + 1 / 16) / 3)
    assert scores["beta_object_words"] is None and scores["beta_function_words"] is None


def test_betas_of_object_words_against_function_words():
    captions = [["a", "small", "red", "circle", "and", "blue", "<end>"], ["a", "blue", "square"]]
    betas = [torch.tensor([0.9, 0.5, 0.1, 0.2, 0.7, 0.4, 0.3]), [0.8, 0.0, 0.2]]
    attentions = [maps(*[UNIFORM] * 7), maps(*[UNIFORM] * 3)]
    scores = grounding_scores(captions, attentions, [[RED_CIRCLE], [BLUE_SQUARE]], GRID, betas=betas)
    # object words: red, circle; blue, square. Function words: a, and; a. Neither: small (a size), the first
    # image's blue (a colour it lacks), <end>.
    assert scores["beta_object_words"] == pytest.approx((0.1 + 0.2 + 0.0 + 0.2) / 4)
    assert scores["beta_function_words"] == pytest.approx((0.9 + 0.7 + 0.8) / 3)


def test_cell_coverage_is_exact_for_any_boxes():
    coverage = cell_coverage([[0.1, 0.1, 0.3, 0.3]], GRID)
    assert coverage[0] == pytest.approx(0.15 ** 2 * GRID ** 2)  # [0.1, 0.25]^2 of cell (0, 0)
    assert coverage.sum() / GRID ** 2 == pytest.approx(0.2 * 0.2)
    union = cell_coverage([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], [0.9, 0.9, 1.5, 1.5]], GRID)
    assert union.sum() / GRID ** 2 == pytest.approx(0.25 + 0.25 - 0.0625 + 0.01)  # overlap once; clipped
    assert union.max() == pytest.approx(1) and union.min() == 0


def test_uniform_attention_always_scores_the_baseline_on_shapes_scenes():
    for index in range(20):
        scene, _ = shapes.scene_at(3, index)
        objects = shapes.object_records(scene)
        words = shapes.canonical_caption(scene)
        grid_size = 7
        scores = grounding_scores([words], [np.ones((len(words), grid_size ** 2))], [objects], grid_size)
        assert scores["object_words"] == 2 * len(objects)
        assert scores["mass_in_box"] == pytest.approx(scores["uniform_mass_in_box"])
        # A word's referent covers the objects that share it; their boxes lie in separate bands.
        areas = [sum(shapes.SIZES[other.size] ** 2 for other in scene.objects if word in (other.colour, other.shape))
                 for obj in scene.objects for word in (obj.colour, obj.shape)]
        assert scores["uniform_mass_in_box"] == pytest.approx(np.mean(areas))


def test_misaligned_inputs_are_refused():
    with pytest.raises(utils.ToolkitError, match="1 attentions for 2 captions"):
        grounding_scores([["red"], ["red"]], [maps(UNIFORM)], [[RED_CIRCLE], [RED_CIRCLE]], GRID)
    with pytest.raises(utils.ToolkitError, match=r"image 0 has 2 words and attention of shape \(1, 16\)"):
        grounding_scores([["red", "circle"]], [maps(UNIFORM)], [[RED_CIRCLE]], GRID)
    with pytest.raises(utils.ToolkitError, match="image 0 has 1 words and 2 betas"):
        grounding_scores([["red"]], [maps(UNIFORM)], [[RED_CIRCLE]], GRID, betas=[[0.1, 0.2]])
