"""Does attention look at what a word names? The grounding score of generated captions on data with boxes.

    scores = grounding_scores(captions, attentions, objects, grid_size, betas=None)

An image's objects are {"words": [size, colour, shape], "box": [x0, y0, x1, y1]} with the box in fractions
of the image side (shapes.object_records; the REFS file carries them). A generated word is an *object
word* when it is the colour or the shape word of an object in the image; the size word is not counted
(it is relative: "small" means something only next to "large"). Its referent is the union of the boxes
of every object in the image that has that colour or shape ("red" with a red circle and a red square:
both boxes), so a word never has to be matched to one of several objects it fits equally well.

Per object word, with the word's attention map over the G x G grid (row-major, row 0 at the top, as the
encoder flattens it) and each cell counted by the share of its area inside the referent (exact, so a
cell half inside counts one half):
  - peak_in_box: that share for the cell of highest attention (ties: the mean over the tied cells);
  - mass_in_box: the share of the map's attention mass inside the referent;
  - uniform_mass_in_box: what a uniform map would get, i.e. the share of the image the referent covers.
Each is averaged over every object word of the split (words pooled over images). Words that name
nothing in their image (a colour or shape the scene lacks, "and", "<end>") are not counted.

For the adaptive decoder, betas (the sentinel's weight per generated word) give beta_object_words, the
mean beta over object words, against beta_function_words, the mean over function words: generated words
that are no size, colour or shape word of any object in the split and no special token.
"""
import numpy as np

from utils import ToolkitError, to_numpy
from vocabulary import SPECIAL_WORDS

NOT_WORDS = (*SPECIAL_WORDS, "<unk>")
SIZE_WORD = 0  # position in an object's words; the words after it (colour, shape) name the object


def naming_words(obj):
    """The words that name an object: its colour and its shape."""
    return obj["words"][SIZE_WORD + 1:]


def cell_coverage(boxes, grid_size):
    """(G*G,) row-major: the share of each attention cell's area inside the union of `boxes` (N, 4), each
    [x0, y0, x1, y1] in fractions of the image side, clipped to the image."""
    boxes = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
    grid_lines = np.linspace(0.0, 1.0, grid_size + 1)
    # Split the image at every grid line and box edge: each piece lies in one cell and is either inside
    # some box or outside all of them.
    xs = np.unique(np.concatenate([grid_lines, boxes[:, [0, 2]].ravel()]))
    ys = np.unique(np.concatenate([grid_lines, boxes[:, [1, 3]].ravel()]))
    x_mid, y_mid = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # (X,), (Y,)
    inside_x = (boxes[:, None, 0] <= x_mid) & (x_mid <= boxes[:, None, 2])  # (N, X)
    inside_y = (boxes[:, None, 1] <= y_mid) & (y_mid <= boxes[:, None, 3])  # (N, Y)
    covered = (inside_y[:, :, None] & inside_x[:, None, :]).any(axis=0)  # (Y, X)
    piece_area = np.outer(np.diff(ys), np.diff(xs)) * covered  # (Y, X)
    rows = np.minimum((y_mid * grid_size).astype(int), grid_size - 1)
    columns = np.minimum((x_mid * grid_size).astype(int), grid_size - 1)
    coverage = np.zeros((grid_size, grid_size))
    np.add.at(coverage, (rows[:, None], columns[None, :]), piece_area)
    return coverage.reshape(-1) * grid_size ** 2  # area in box / area of a cell


def referent_boxes(word, objects):
    """The boxes of the objects whose colour or shape `word` is ([] when it names none of them)."""
    return [obj["box"] for obj in objects if word in naming_words(obj)]


def image_grounding(words, attention, objects, grid_size):
    """The object words of one image: {"positions": their indices in `words`, "peak_in_box", "mass_in_box",
    "uniform_mass_in_box": one value per object word}.

    words: the generated words, one per attention map; attention: (T, G*G) or (T, G, G), T = len(words).
    """
    attention = to_numpy(attention).reshape(len(words), -1)  # (T, G*G)
    record = {"positions": [], "peak_in_box": [], "mass_in_box": [], "uniform_mass_in_box": []}
    for position, word in enumerate(words):
        boxes = referent_boxes(word, objects)
        if not boxes:
            continue
        coverage = cell_coverage(boxes, grid_size)  # (G*G,)
        weights = attention[position]  # (G*G,)
        record["positions"].append(position)
        record["peak_in_box"].append(float(coverage[weights == weights.max()].mean()))
        record["mass_in_box"].append(float(weights @ coverage / weights.sum()))
        record["uniform_mass_in_box"].append(float(coverage.mean()))
    return record


def grounding_scores(captions, attentions, objects, grid_size, betas=None):
    """The grounding score of a split (see the module's docstring for the definitions).

    captions: per image, the generated words (strings, one per attention map, e.g. the words after
        <start> up to <end> included); attentions: per image, (T, G*G) or (T, G, G) maps, a numpy array
        or a torch tensor; objects: per image, its objects, or None for an image without boxes (skipped);
        betas: per image, (T,) sentinel weights of the adaptive decoder, or None.
    Returns {"peak_in_box", "mass_in_box", "uniform_mass_in_box", "object_words", "beta_object_words",
    "beta_function_words"}: means (None when there is nothing to average) and the number of object words.
    """
    _check_inputs(captions, attentions, objects, grid_size, betas)
    attribute_words = {word for scene in objects if scene for obj in scene for word in obj["words"]}
    totals = {"peak_in_box": [], "mass_in_box": [], "uniform_mass_in_box": []}
    object_betas, function_betas = [], []
    for index, (words, attention, scene) in enumerate(zip(captions, attentions, objects)):
        if scene is None:
            continue
        record = image_grounding(words, attention, scene, grid_size)
        for key, values in totals.items():
            values.extend(record[key])
        if betas is not None:
            word_betas = to_numpy(betas[index]).reshape(-1)  # (T,)
            object_betas.extend(word_betas[record["positions"]])
            function_betas.extend(beta for word, beta in zip(words, word_betas)
                                  if word not in attribute_words and word not in NOT_WORDS)
    scores = {key: _mean(values) for key, values in totals.items()}
    return dict(scores, object_words=len(totals["mass_in_box"]), beta_object_words=_mean(object_betas),
                beta_function_words=_mean(function_betas))


def _check_inputs(captions, attentions, objects, grid_size, betas):
    """Refuse inputs that are not aligned per image and per word, naming the image and the counts."""
    per_image = {"attentions": attentions, "objects": objects, **({"betas": betas} if betas is not None else {})}
    for name, values in per_image.items():
        if len(values) != len(captions):
            raise ToolkitError(f"grounding: {len(values)} {name} for {len(captions)} captions; pass one per image")
    for index, (words, attention) in enumerate(zip(captions, attentions)):
        shape = tuple(to_numpy(attention).shape)
        if np.prod(shape) != len(words) * grid_size ** 2:
            raise ToolkitError(f"grounding: image {index} has {len(words)} words and attention of shape {shape}; "
                               f"pass one map of {grid_size} x {grid_size} cells per generated word")
        if betas is not None and to_numpy(betas[index]).size != len(words):
            raise ToolkitError(f"grounding: image {index} has {len(words)} words and "
                               f"{to_numpy(betas[index]).size} betas; pass one beta per generated word")


def _mean(values):
    return float(np.mean(values)) if len(values) else None


def caption_grounding(captions, rev_word_map, objects, grid_size):
    """The grounding of beam search's Captions (word ids from <start>, alphas (T, P), betas (T,) or None):
    (grounding_scores of the split, per image the mean mass_in_box of its object words or None)."""
    words = [[rev_word_map[word] for word in caption.words[1:]] for caption in captions]  # one per map
    attentions = [caption.alphas for caption in captions]
    betas = [caption.betas for caption in captions] if captions[0].betas is not None else None
    scores = grounding_scores(words, attentions, objects, grid_size, betas)
    per_image = [None if scene is None else _mean(image_grounding(image_words, attention, scene, grid_size)["mass_in_box"])
                 for image_words, attention, scene in zip(words, attentions, objects)]
    return scores, per_image
