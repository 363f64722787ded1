"""The embedded shapes dataset: deterministic, Karpathy format, captions true of the pixels, BLEU ceiling."""
import colorsys
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

import shapes
import utils

SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # share of its bounding box a shape fills
HUES = {"red": 0, "yellow": 60, "green": 120, "blue": 230}  # degrees, what the colour words mean
MIN_CHROMA = 90  # max - min channel of a shape's pixel; the filtered grey background stays below
COUNTS = {"train": 8, "val": 2, "test": 3}
IMAGE_SIZE = 256


def make(folder, seed=0):
    return shapes.make_shapes_dataset(str(folder), COUNTS["train"], COUNTS["val"], COUNTS["test"], seed, IMAGE_SIZE)


def read_dataset(json_path):
    """JSON bytes and {filename: image bytes} of a dataset folder."""
    folder = os.path.join(os.path.dirname(json_path), shapes.IMAGE_FOLDER)
    with open(json_path, "rb") as file:
        json_bytes = file.read()
    images = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as file:
            images[name] = file.read()
    return json_bytes, images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    json_path = make(tmp_path_factory.mktemp("shapes"))
    with open(json_path) as file:
        return json_path, json.load(file)


def colour_name(patch):
    """Colour word whose hue is nearest the mean hue of an RGB patch."""
    hue = 360 * colorsys.rgb_to_hsv(*(patch.reshape(-1, 3).mean(axis=0) / 255))[0]
    return min(HUES, key=lambda name: min(abs(hue - HUES[name]), 360 - abs(hue - HUES[name])))


def left_to_right(tokens):
    """The objects a caption names, as (size, colour, shape), reordered from left to right."""
    named = [(SIZE_WORDS[tokens[i + 1]], tokens[i + 2], tokens[i + 3])
             for i in range(len(tokens) - 3) if tokens[i] == "a" and tokens[i + 1] in SIZE_WORDS]
    if "right" in tokens:  # "<B> to the right of <A>"
        return named[::-1]
    if "between" in tokens:  # "<B> between <A> and <C>"
        return [named[1], named[0], named[2]]
    return named


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    json_path, _ = dataset
    again = read_dataset(make(tmp_path / "again", seed=0))
    other = read_dataset(make(tmp_path / "other", seed=1))
    first = read_dataset(json_path)
    assert again == first
    assert other[0] != first[0]
    assert all(other[1][name] != first[1][name] for name in first[1])


def test_karpathy_format_with_split_counts_and_five_distinct_sentences(dataset):
    json_path, data = dataset
    assert data["dataset"] == "shapes"
    images = data["images"]
    assert [sum(image["split"] == split for image in images) for split in COUNTS] == list(COUNTS.values())
    sentids = [sentid for image in images for sentid in image["sentids"]]
    assert len(set(sentids)) == len(sentids)
    for imgid, image in enumerate(images):
        assert image["imgid"] == imgid and "cocoid" not in image
        path = os.path.join(os.path.dirname(json_path), image["filepath"], image["filename"])
        with Image.open(path) as picture:
            assert (picture.format, picture.size, picture.mode) == ("JPEG", (IMAGE_SIZE, IMAGE_SIZE), "RGB")
        sentences = image["sentences"]
        assert len({" ".join(sentence["tokens"]) for sentence in sentences}) == 5
        assert [sentence["sentid"] for sentence in sentences] == image["sentids"]
        for sentence in sentences:
            assert sentence["imgid"] == imgid
            assert sentence["tokens"] == shapes.tokenize(sentence["raw"])
            assert all(token.isalpha() and token.islower() for token in sentence["tokens"])
            assert len(sentence["tokens"]) <= 16


def test_captions_name_every_object_left_to_right():
    for index in range(60):
        scene, sentences = shapes.scene_at(7, index)
        objects = [(obj.size, obj.colour, obj.shape) for obj in scene.objects]
        assert 1 <= len(objects) <= 3 and len(set(objects)) == len(objects)
        for sentence in sentences:
            assert left_to_right(shapes.tokenize(sentence)) == objects, sentence


def test_rendered_pixels_show_the_captioned_objects(dataset):
    json_path, data = dataset
    for image in data["images"]:
        scene, _ = shapes.scene_at(0, image["imgid"])
        assert left_to_right(image["sentences"][0]["tokens"]) == [(o.size, o.colour, o.shape) for o in scene.objects]
        path = os.path.join(os.path.dirname(json_path), image["filepath"], image["filename"])
        with Image.open(path) as picture:  # the median filter removes isolated noisy pixels
            pixels = np.asarray(picture.filter(ImageFilter.MedianFilter(3)), dtype=float)  # S x S x 3
        coloured = pixels.max(axis=2) - pixels.min(axis=2) > MIN_CHROMA  # IMAGE_SIZE x IMAGE_SIZE
        spans = []
        for obj in scene.objects:
            row, column = round(obj.y * IMAGE_SIZE), round(obj.x * IMAGE_SIZE)
            assert colour_name(pixels[row - 1:row + 2, column - 1:column + 2]) == obj.colour, image["filename"]
            left, top, right, bottom = (round(v) for v in shapes.object_box(obj, IMAGE_SIZE))
            mask = coloured[top:bottom, left:right]
            fill = mask.mean()
            assert min(FILL_RATIOS, key=lambda shape: abs(FILL_RATIOS[shape] - fill)) == obj.shape
            width = mask.any(axis=0).sum() / IMAGE_SIZE
            assert (width > 0.2) == (obj.size == "large")  # large: over a fifth of the image wide; small: under
            around = coloured[top - 1:bottom + 2, left - 1:right + 2]  # Pillow also fills the far edges
            spans.append(left - 1 + np.flatnonzero(around.any(axis=0)))  # its columns
        # Objects listed left to right; no coloured column outside them.
        assert coloured.any(axis=0).sum() == sum(span.size for span in spans)
        assert all(a.max() < b.min() for a, b in zip(spans, spans[1:]))


def test_each_objects_pixels_lie_inside_its_box_and_fill_it(dataset):
    json_path, data = dataset
    for image in data["images"]:
        canonical = shapes.canonical_caption(shapes.scene_at(0, image["imgid"])[0])
        named = [tuple(obj["words"]) for obj in image["objects"]]
        assert left_to_right(canonical) == named  # words as the canonical caption writes them
        path = os.path.join(os.path.dirname(json_path), image["filepath"], image["filename"])
        with Image.open(path) as picture:
            pixels = np.asarray(picture.filter(ImageFilter.MedianFilter(3)), dtype=float)  # S x S x 3
        rows, columns = np.nonzero(pixels.max(axis=2) - pixels.min(axis=2) > MIN_CHROMA)  # coloured pixels
        rows, columns = rows + 0.5, columns + 0.5  # pixel centres, in pixels
        claimed = np.zeros(len(rows), dtype=bool)
        for (size, colour, _), obj in zip(named, image["objects"]):
            left, top, right, bottom = np.array(obj["box"]) * IMAGE_SIZE
            assert 0 <= left < right <= IMAGE_SIZE and 0 <= top < bottom <= IMAGE_SIZE
            assert right - left == pytest.approx(shapes.SIZES[size] * IMAGE_SIZE)
            # Pillow also fills the pixels on the far edges (their centres half a pixel outside): 1 px slack.
            inside = (left - 1 <= columns) & (columns <= right + 1) & (top - 1 <= rows) & (rows <= bottom + 1)
            assert colour_name(pixels[rows[inside].astype(int), columns[inside].astype(int)]) == colour
            # The box is tight: the object reaches each of its sides (the median filter erodes thin tips).
            assert columns[inside].min() - left < 3 and right - columns[inside].max() < 3
            assert rows[inside].min() - top < 5 and bottom - rows[inside].max() < 3
            claimed |= inside
        assert claimed.all()  # no coloured pixel outside every box
        lefts = [obj["box"][0] for obj in image["objects"]]
        assert lefts == sorted(lefts)  # left to right


def test_a_caption_naming_every_object_scores_high_and_a_blind_one_low():
    scenes, references = shapes.references_at(0, range(2200, 2400))
    fresh = shapes.fresh_bleu(scenes, references, np.random.default_rng(123))
    canonical = shapes.canonical_bleu(scenes, references)
    constants = ["a large red circle", "a small red circle and a large blue square",
                 "a small red circle to the left of a large blue square",
                 "two shapes a small red circle and a large blue square",
                 "a small red circle a large blue square and a small green triangle"]
    blind, _ = shapes.best_constant_caption(references, [caption.split() for caption in constants])
    assert fresh >= 0.8 and canonical >= 0.8
    assert blind <= 0.35 and blind <= min(fresh, canonical) - 0.5


def test_a_failed_run_leaves_no_json(tmp_path, monkeypatch):
    json_path = make(tmp_path)
    calls = []

    def render_then_fail(scene, image_size):
        calls.append(scene)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Image.new("RGB", (image_size, image_size))

    monkeypatch.setattr(shapes, "render_scene", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path)
    assert not os.path.exists(json_path)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize("arguments", [{"n_train": -1}, {"seed": 1.5}, {"image_size": 8}])
def test_bad_arguments_are_refused(tmp_path, arguments):
    with pytest.raises(utils.ToolkitError, match=next(iter(arguments))):
        shapes.make_shapes_dataset(str(tmp_path), **arguments)
    assert not os.path.exists(tmp_path / shapes.JSON_NAME)
