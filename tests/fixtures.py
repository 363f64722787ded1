"""Tiny Karpathy-format data sets for tests: a split JSON and real image files in several Pillow modes."""
import json
import os
import random

import numpy as np
from PIL import Image

# (Pillow mode, file format): RGB, grey, alpha, CMYK, palette and 16-bit images, cycled over the images
IMAGE_MODES = (("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("I;16", "PNG"))
COMMON_WORDS = ("a", "red", "blue", "circle", "square", "on", "the", "left", "right", "of", "small", "big")
SENTENCES_PER_IMAGE = (3, 5, 7, 4, 6)  # fewer and more than 5


def write_image(path, mode, file_format, size, rng):
    """A distinct random picture in `mode`, saved as `file_format`."""
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    rgb = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # 0..65535
    elif mode == "P":
        image = rgb.quantize(colors=16)
    else:
        image = rgb.convert(mode)
    image.save(path, file_format)


def make_sentence(rng, sentence_index, image_index):
    length = rng.randint(3, 8)
    tokens = [rng.choice(COMMON_WORDS) for _ in range(length)]
    if sentence_index == 0:
        tokens.append(f"rare{image_index}")  # seen once: becomes <unk> for min_word_freq >= 1
    return tokens


def write_tiny_karpathy(folder, n_per_split=3, dataset="flickr8k", image_size=(48, 36), seed=0,
                        modes=IMAGE_MODES, images_subfolder="images"):
    """Write `n_per_split` train (every other one labelled restval), val and test images and their
    Karpathy split JSON `folder/dataset_<dataset>.json`; return (json_path, image_folder).

    COCO (`dataset="coco"`) puts images at image_folder/filepath/filename and gives each a cocoid;
    other datasets put them at image_folder/filename. Images cycle through `modes`, sentence counts
    through SENTENCES_PER_IMAGE; each image's first sentence has a word seen only once.
    """
    rng, pixel_rng = random.Random(seed), np.random.default_rng(seed)
    image_folder = os.path.join(folder, images_subfolder)
    splits = ["train" if index % 2 == 0 else "restval" for index in range(n_per_split)]
    splits += ["val"] * n_per_split + ["test"] * n_per_split
    records = []
    for index, split in enumerate(splits):
        mode, file_format = modes[index % len(modes)]
        extension = "jpg" if file_format == "JPEG" else "png"
        record = {"split": split, "imgid": index, "sentids": [], "sentences": []}
        if dataset == "coco":
            record["filepath"] = "val2014" if split in ("val", "test") else "train2014"
            record["cocoid"] = 1000 + index
            record["filename"] = f"COCO_{record['filepath']}_{record['cocoid']:012d}.{extension}"
            path = os.path.join(image_folder, record["filepath"], record["filename"])
        else:
            record["filename"] = f"{index:04d}_{mode.replace(';', '')}.{extension}"
            path = os.path.join(image_folder, record["filename"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_image(path, mode, file_format, image_size, pixel_rng)
        for sentence_index in range(SENTENCES_PER_IMAGE[index % len(SENTENCES_PER_IMAGE)]):
            tokens = make_sentence(rng, sentence_index, index)
            sentid = index * 10 + sentence_index
            record["sentids"].append(sentid)
            record["sentences"].append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".",
                                        "imgid": index, "sentid": sentid})
        records.append(record)
    json_path = os.path.join(folder, f"dataset_{dataset}.json")
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump({"images": records, "dataset": dataset}, file)
    return json_path, image_folder
