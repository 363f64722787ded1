"""Shared fixtures: the toolkit's modules on the path, and a tiny preprocessed shapes data set."""
import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from create_input_files import create_input_files  # noqa: E402  (needs the path above)
from shapes import make_shapes_dataset  # noqa: E402


@dataclass
class TinyData:
    folder: str
    data_name: str


def make_tiny_shapes(folder, n_train=24, n_val=8, n_test=8, image_size=64):
    """Shapes scenes preprocessed like COCO, small enough to train on in seconds."""
    json_path = make_shapes_dataset(folder, n_train, n_val, n_test, seed=0, image_size=image_size)
    create_input_files("shapes", json_path, os.path.join(folder, "shapes_images"), captions_per_image=5,
                       min_word_freq=0, output_folder=folder, image_size=image_size, workers=1)
    return TinyData(str(folder), "shapes_5_cap_per_img_0_min_word_freq")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A read-only tiny data folder shared by the whole session (copy it before changing files)."""
    return make_tiny_shapes(tmp_path_factory.mktemp("tiny_shapes"))


def tiny_cfg(data, output_folder, **overrides):
    """A cfg that trains in seconds on the CPU: a random ResNet-18, small decoder, one epoch."""
    cfg = {"data_folder": data.folder, "data_name": data.data_name, "encoder": "resnet18", "encoder_weights": None,
           "encoded_image_size": 4, "embed_dim": 32, "attention_dim": 32, "decoder_dim": 32, "epochs": 1,
           "batch_size": 40, "workers": 0, "output_folder": str(output_folder), "print_freq": 0, "device": "cpu",
           "cache_folder": str(output_folder)}
    return dict(cfg, **overrides)
