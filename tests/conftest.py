"""Shared fixtures: the toolkit's modules on the path, a tiny preprocessed shapes data set, and a tiny CLIP model
with the CLIP-S recipe by hand."""
import json
import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from create_input_files import create_input_files  # noqa: E402  (needs the path above)
from images import CLIP_MEAN, CLIP_STD  # noqa: E402
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


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A one-block open_clip model registered as "tiny-test-clip" (32 x 32 images, open_clip's own tokenizer),
    random weights."""
    import open_clip

    path = tmp_path_factory.mktemp("clip") / "tiny-test-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model("tiny-test-clip").eval(), open_clip.get_tokenizer("tiny-test-clip")


def hand_embeddings(model, tokenizer, images, texts):
    """The paper's recipe by hand: pixels in [0, 1] resized to the tiny CLIP's side, CLIP's mean and std; texts
    prefixed with "A photo depicts"; unit-length embeddings."""
    pixels = F.interpolate(images.float() / 255, size=(32, 32), mode="bicubic", antialias=True)
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(["A photo depicts " + t for t in texts])), dim=-1)
    return image, text
