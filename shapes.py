"""The embedded `shapes` dataset: synthetic scenes of coloured shapes with true, templated captions.

A scene holds 1 to 3 distinct objects (size, colour, shape), each in its own vertical band of the
image so that left and right are well defined, over a noisy grey background. Every caption names
every object; the templates share long n-grams and synonyms are rare, so a caption that names the
objects right scores a high BLEU-4 against the references, while a caption written without looking
at the image (the same for every image) scores low. Each image's record in the JSON also lists its
objects' words and bounding boxes ("objects"), for scoring where attention looks (grounding.py).

    json_path = make_shapes_dataset("data", n_train=2000, n_val=200, n_test=200, seed=0)
    python shapes.py --scenes 200     # prints the BLEU-4 ceiling and blind baseline
"""
import argparse
import contextlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from nltk.translate.bleu_score import corpus_bleu
from PIL import Image, ImageDraw
from tqdm import tqdm

import utils

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "large": 0.28}  # side of the object's bounding box, as a fraction of the image side
SYNONYMS = {"small": "little", "large": "big"}
SYNONYM_RATE = 0.05  # chance that an object's size is written with its synonym ("big", "little")
MAX_OBJECTS = 3
MARGIN = 0.02  # least gap between an object and the edge of its band, as a fraction of the image side
BACKGROUND_LEVELS = (90, 150)  # grey level of the background, drawn per scene
COLOUR_JITTER = 12  # per-channel shift of an object's colour, drawn per object
NOISE_STD = 12  # Gaussian pixel noise over the whole image
JPEG_QUALITY = 90
IMAGE_FOLDER = "shapes_images"
JSON_NAME = "dataset_shapes.json"

# (weight, template) per object count; {0} {1} {2} are the objects from left to right, each written
# "a <size> <colour> <shape>". The first template of each count is the canonical caption.
TEMPLATES = {
    1: ((4, "{0}."), (1, "One shape: {0}."), (1, "A picture of {0}."), (1, "{0} on a grey background."),
        (1, "{0} on its own."), (1, "{0} alone.")),
    2: ((4, "{0} and {1}."), (1, "Two shapes: {0} and {1}."), (1, "{0} to the left of {1}."),
        (1, "{1} to the right of {0}."), (1, "{0} next to {1}."), (1, "{0} beside {1}.")),
    3: ((4, "{0}, {1} and {2}."), (1, "Three shapes: {0}, {1} and {2}."), (1, "{1} between {0} and {2}."),
        (1, "{0} followed by {1} and {2}."), (1, "{0}, {1} and {2} in a row."), (1, "{0} next to {1} and {2}.")),
}


@dataclass(frozen=True)
class SceneObject:
    """One shape; x and y are its centre as fractions of the image side."""
    size: str
    colour: str
    shape: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """Objects from left to right, the background's grey level, and the seed of its pixel noise."""
    objects: tuple
    background: int
    noise_seed: int


def random_scene(rng):
    """Draw 1 to 3 distinct objects, object i inside the i-th of equal vertical bands of the image."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    kinds = [(size, colour, shape) for size in SIZES for colour in COLOURS for shape in SHAPES]
    band = 1 / count
    objects = []
    for index, kind in enumerate(rng.choice(len(kinds), size=count, replace=False)):
        size, colour, shape = kinds[kind]
        half = SIZES[size] / 2 + MARGIN
        x = rng.uniform(index * band + half, (index + 1) * band - half)
        y = rng.uniform(half, 1 - half)
        objects.append(SceneObject(size, colour, shape, float(x), float(y)))
    background = int(rng.integers(*BACKGROUND_LEVELS, endpoint=True))
    return Scene(tuple(objects), background, int(rng.integers(2 ** 32)))


def object_box(obj, image_size):
    """Bounding box (left, top, right, bottom) of an object, in pixels."""
    half = SIZES[obj.size] / 2 * image_size
    x, y = obj.x * image_size, obj.y * image_size
    return x - half, y - half, x + half, y + half


def render_scene(scene, image_size=256):
    """Draw a scene as an RGB PIL image of image_size x image_size pixels (same scene, same pixels)."""
    rng = np.random.default_rng(scene.noise_seed)
    image = Image.new("RGB", (image_size, image_size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER, size=3, endpoint=True)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
        left, top, right, bottom = object_box(obj, image_size)
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    noise = NOISE_STD * rng.standard_normal((image_size, image_size, 3), dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def tokenize(sentence):
    """Lowercase words without punctuation, as in Karpathy's JSON files."""
    return re.findall(r"[a-z]+", sentence.lower())


def _phrase(obj, rng=None):
    """'a <size> <colour> <shape>'; with an rng, the size word is now and then its synonym."""
    size = SYNONYMS[obj.size] if rng is not None and rng.random() < SYNONYM_RATE else obj.size
    return f"a {size} {obj.colour} {obj.shape}"


def scene_sentences(scene, rng, n=5):
    """n different sentences (raw text) true of the scene, from templates drawn without replacement."""
    templates = TEMPLATES[len(scene.objects)]
    if not 1 <= n <= len(templates):
        raise ValueError(f"n={n}: a scene of {len(scene.objects)} objects has {len(templates)} templates")
    weights = np.array([weight for weight, _ in templates], dtype=float)
    sentences = []
    for choice in rng.choice(len(templates), size=n, replace=False, p=weights / weights.sum()):
        text = templates[choice][1].format(*(_phrase(obj, rng) for obj in scene.objects))
        sentences.append(text[0].upper() + text[1:])
    return sentences


def describe_scene(scene, rng, n=5):
    """n different captions (token lists) true of the scene."""
    return [tokenize(sentence) for sentence in scene_sentences(scene, rng, n)]


def canonical_caption(scene):
    """The most frequent caption of a scene: its objects from left to right, no synonyms."""
    return tokenize(TEMPLATES[len(scene.objects)][0][1].format(*(_phrase(obj) for obj in scene.objects)))


def scene_at(seed, index):
    """Scene and 5 reference sentences of image `index` of the dataset made with `seed`."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    return scene, scene_sentences(scene, rng)


def object_records(scene):
    """The scene's objects from left to right as the JSON's "objects": {"words": [size, colour, shape] as
    the canonical caption writes them, "box": [x0, y0, x1, y1] in fractions of the image side}."""
    return [{"words": [obj.size, obj.colour, obj.shape], "box": list(object_box(obj, 1.0))} for obj in scene.objects]


def _image_entry(index, split, filename, scene, sentences):
    """One image in Karpathy's JSON format, flickr-style: the file is image_folder/filename, no cocoid; plus
    the boxes of its objects."""
    sentids = [index * len(sentences) + k for k in range(len(sentences))]
    return {"filepath": IMAGE_FOLDER, "filename": filename, "imgid": index, "split": split, "sentids": sentids,
            "sentences": [{"tokens": tokenize(raw), "raw": raw, "imgid": index, "sentid": sentid}
                          for raw, sentid in zip(sentences, sentids)],
            "objects": object_records(scene)}


def _check_arguments(counts, seed, image_size):
    """Refuse negative counts or seeds and images too small to show a small shape."""
    for name, value in list(counts.items()) + [("seed", seed)]:
        if not isinstance(value, int) or value < 0:
            raise utils.ToolkitError(f"shapes dataset: {name}={value!r} must be a whole number >= 0")
    if not isinstance(image_size, int) or image_size < 32:
        raise utils.ToolkitError(f"shapes dataset: image_size={image_size!r} must be a whole number >= 32")


def make_shapes_dataset(folder, n_train=2000, n_val=200, n_test=200, seed=0, image_size=256):
    """Write the JPEG scenes under folder/shapes_images and their captions as folder/dataset_shapes.json,
    each image with its objects' words and boxes (object_records).

    The same seed gives the same bytes. The JSON is written last and atomically (an older one is
    removed first), so it never lists missing or half-written images. Returns the JSON's path.
    """
    _check_arguments({"n_train": n_train, "n_val": n_val, "n_test": n_test}, seed, image_size)
    json_path = os.path.join(folder, JSON_NAME)
    image_folder = os.path.join(folder, IMAGE_FOLDER)
    os.makedirs(image_folder, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(json_path)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    images = []
    for index, split in enumerate(tqdm(splits, desc="shapes images", unit="img")):
        scene, sentences = scene_at(seed, index)
        filename = f"shapes_{index:06d}.jpg"
        render_scene(scene, image_size).save(os.path.join(image_folder, filename), quality=JPEG_QUALITY)
        images.append(_image_entry(index, split, filename, scene, sentences))
    with utils.atomic_path(json_path) as tmp, open(tmp, "w") as file:
        json.dump({"dataset": "shapes", "images": images}, file)
    return json_path


def references_at(seed, indices):
    """Scenes and tokenized references of the images `indices` of the dataset made with `seed`."""
    pairs = [scene_at(seed, index) for index in indices]
    return [scene for scene, _ in pairs], [[tokenize(sentence) for sentence in sentences] for _, sentences in pairs]


def fresh_bleu(scenes, references, rng):
    """BLEU-4 of one fresh caption per scene, drawn with `rng`: how consistent the references are."""
    return corpus_bleu(references, [describe_scene(scene, rng, n=1)[0] for scene in scenes])


def canonical_bleu(scenes, references):
    """BLEU-4 of the canonical caption of each scene."""
    return corpus_bleu(references, [canonical_caption(scene) for scene in scenes])


def best_constant_caption(references, candidates):
    """(BLEU-4, caption) of the best caption among candidates when it is given for every image."""
    return max((corpus_bleu(references, [caption] * len(references)), caption) for caption in candidates)


def bleu_figures(n_scenes=200, seed=0, first_index=2200):
    """Fresh, canonical and blind BLEU-4 on scenes first_index.. (by default the test split of a default
    dataset), the blind caption being the best of many constant captions; vocabulary and caption length."""
    scenes, references = references_at(seed, range(first_index, first_index + n_scenes))
    # Blind candidates: the most common references, and every reference of 50 other scenes.
    counts = Counter(" ".join(tokens) for refs in references for tokens in refs)
    candidates = [caption.split() for caption, _ in counts.most_common(20)]
    candidates += [tokens for refs in references_at(seed + 1, range(50))[1] for tokens in refs]
    blind, blind_caption = best_constant_caption(references, candidates)
    sentences = [tokens for refs in references for tokens in refs]
    return {"fresh": fresh_bleu(scenes, references, np.random.default_rng([seed, first_index, 1])),
            "canonical": canonical_bleu(scenes, references), "blind": blind, "blind_caption": " ".join(blind_caption),
            "vocabulary": len({word for tokens in sentences for word in tokens}),
            "mean_length": float(np.mean([len(tokens) for tokens in sentences])),
            "max_length": max(len(tokens) for tokens in sentences)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="BLEU-4 ceiling and blind baseline of the shapes captions.")
    parser.add_argument("--scenes", type=int, default=200, help="number of scenes to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-index", type=int, default=2200, help="first scene (default: the test split)")
    args = parser.parse_args(argv)
    for name, value in bleu_figures(args.scenes, args.seed, args.first_index).items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    utils.run_cli(main)
