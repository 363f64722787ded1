"""Bench data at COCO's sizes on shapes pictures: a vocabulary of 9,490 words (COCO's Karpathy split with
min_word_freq 5) and captions of COCO's lengths (mean 10.5 words, a few up to 50), so that the output layer, the
loss and the decoding steps cost what they cost on COCO. The captions are random words: for speed, not for
learning."""
import json
import os

import numpy as np

from benchmarks.common import CAPTIONS_PER_IMAGE, SEED, BenchData, calibrated_weights
from create_input_files import create_input_files
from data_files import base_name
from shapes import IMAGE_FOLDER, make_shapes_dataset
from utils import atomic_path

COCO_VOCABULARY = 9490
COCO_MEAN_WORDS = 10.5
COCO_MAX_WORDS = 50
LONG_CAPTIONS = 0.01  # share of captions between 20 and 50 words


def caption_lengths(count, generator):
    """`count` caption lengths: most about COCO's mean (8 to 16 words), a few long ones up to COCO_MAX_WORDS."""
    lengths = np.clip(np.rint(generator.normal(COCO_MEAN_WORDS - 0.3, 1.9, count)), 8, 16).astype(int)
    long = generator.random(count) < LONG_CAPTIONS
    lengths[long] = generator.integers(20, COCO_MAX_WORDS + 1, long.sum())
    return lengths


def random_captions(images, vocabulary, generator, every_word):
    """CAPTIONS_PER_IMAGE token lists for each of `images` images; with `every_word`, each of the `vocabulary`
    words is used at least once (the first captions take them in a shuffled order, the rest are drawn at random)."""
    lengths = caption_lengths(images * CAPTIONS_PER_IMAGE, generator)
    if every_word and lengths.sum() < vocabulary:
        raise ValueError(f"{images} images x {CAPTIONS_PER_IMAGE} captions of about {COCO_MEAN_WORDS} words cannot "
                         f"use all {vocabulary} words: take at least {vocabulary // 50} images")
    first = generator.permutation(vocabulary) if every_word else np.empty(0, dtype=int)
    words = np.concatenate([first, generator.integers(0, vocabulary, lengths.sum())])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    captions = [[f"w{index}" for index in words[start:start + length]] for start, length in zip(starts, lengths)]
    return [captions[i:i + CAPTIONS_PER_IMAGE] for i in range(0, len(captions), CAPTIONS_PER_IMAGE)]


def make_coco_sized_data(folder, work, backbone, train_images, val_images, image_size, vocabulary=COCO_VOCABULARY):
    """Shapes pictures with random COCO-sized captions, preprocessed like COCO, and calibrated encoder weights."""
    json_path = make_shapes_dataset(folder, train_images, val_images, 1, seed=SEED, image_size=image_size)
    with open(json_path, encoding="utf-8") as file:
        karpathy = json.load(file)
    generator = np.random.default_rng(SEED)
    train = [image for image in karpathy["images"] if image["split"] == "train"]
    others = [image for image in karpathy["images"] if image["split"] != "train"]
    # The train captions use every word: the word map is built from them.
    captions = (random_captions(len(train), vocabulary, generator, every_word=True)
                + random_captions(len(others), vocabulary, generator, every_word=False))
    for image, image_captions in zip(train + others, captions):
        image["sentences"] = [dict(sentence, tokens=tokens, raw=" ".join(tokens))
                              for sentence, tokens in zip(image["sentences"], image_captions)]
    with atomic_path(json_path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        json.dump(karpathy, file)
    create_input_files("shapes", json_path, os.path.join(folder, IMAGE_FOLDER), CAPTIONS_PER_IMAGE, 0, folder,
                       image_size=image_size, max_len=COCO_MAX_WORDS, workers=min(8, os.cpu_count()),
                       overwrite=True)
    name = base_name("shapes", CAPTIONS_PER_IMAGE, 0)
    return BenchData(folder, name, calibrated_weights(backbone, folder, name, os.path.join(work, f"{backbone}.pth")))
