"""datasets: the course's CaptionDataset, the per-image dataset, and the file helpers."""
import collections
import json
import os
import pickle
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datasets
from create_input_files import create_input_files
from fixtures import write_tiny_karpathy
from images import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from utils import ToolkitError

CPI, MAX_LEN, SIZE = 5, 50, 24
NAME = f"flickr8k_{CPI}_cap_per_img_1_min_word_freq"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    json_path, image_folder = write_tiny_karpathy(str(tmp_path_factory.mktemp("source")), n_per_split=4)
    output_folder = str(tmp_path_factory.mktemp("data"))
    create_input_files("flickr8k", json_path, image_folder, CPI, 1, output_folder, image_size=SIZE, workers=1)
    return output_folder


def stored(folder, split):
    """(images uint8 (N, 3, S, S), captions list, caplens list) read straight from the files."""
    paths = datasets.data_paths(folder, NAME, split)
    with h5py.File(paths["images"], "r") as h5, open(paths["captions"]) as captions, open(paths["caplens"]) as caplens:
        return h5["images"][:], json.load(captions), json.load(caplens)


def test_normalize_images_uses_imagenet_mean_and_std():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)  # (B, 3, H, W)
    normalized = normalize_images(images)
    assert normalized.shape == (2, 3, 2, 2) and normalized.dtype == torch.float32
    expected = [(value / 255 - mean) / std for value, mean, std in
                zip((0, 128, 255), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(normalized[1, :, 1, 1], torch.tensor(expected), atol=1e-6)


def test_data_paths_and_word_map(folder):
    paths = datasets.data_paths(folder, NAME, "VAL")
    assert paths == {kind: os.path.join(folder, f"VAL_{kind.upper()}_{NAME}.{'hdf5' if kind == 'images' else 'json'}")
                     for kind in ("images", "captions", "caplens", "refs")}
    word_map = datasets.load_word_map(folder, NAME)
    assert word_map["<pad>"] == 0 and {"<unk>", "<start>", "<end>"} <= set(word_map)


def test_missing_files_name_the_path_and_the_command(folder, tmp_path):
    datasets.check_data_files(folder, NAME, ["TRAIN", "VAL"])
    coco_name = "coco_5_cap_per_img_3_min_word_freq"
    for name in os.listdir(folder):  # a coco folder holding only the word map and the TRAIN files
        if name.startswith("WORDMAP") or name.startswith("TRAIN"):
            shutil.copy(os.path.join(folder, name), tmp_path / name.replace(NAME, coco_name))
    with pytest.raises(ToolkitError, match=f"TEST_IMAGES_{coco_name}.hdf5") as error:
        datasets.check_data_files(str(tmp_path), coco_name, ["TRAIN", "TEST"])
    assert (f"python create_input_files.py --dataset coco --karpathy-json PATH --image-folder DIR --output-folder "
            f"{tmp_path} --captions-per-image 5 --min-word-freq 3") in str(error.value)
    with pytest.raises(ToolkitError, match="--dataset shapes --output-folder"):
        datasets.load_word_map(str(tmp_path), "shapes_5_cap_per_img_5_min_word_freq")
    with pytest.raises(ToolkitError, match="unknown split"):
        datasets.data_paths(folder, NAME, "DEV")


def test_caption_dataset_train_items_follow_the_course(folder):
    images, captions, caplens = stored(folder, "TRAIN")
    dataset = datasets.CaptionDataset(folder, NAME, "TRAIN")
    assert len(dataset) == len(images) * CPI == len(captions)
    for index in (0, 7, len(dataset) - 1):
        image, caption, caplen = dataset[index]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        expected = (torch.from_numpy(images[index // CPI]).double() / 255 - mean) / std
        assert torch.allclose(image.double(), expected, atol=1e-5)
        assert caption.dtype == torch.long and caption.tolist() == captions[index]
        assert caplen.dtype == torch.long and caplen.shape == (1,) and caplen.item() == caplens[index]


def test_caption_dataset_val_items_add_all_captions_and_transform_gets_unit_range(folder):
    images, captions, _ = stored(folder, "VAL")
    seen = []
    dataset = datasets.CaptionDataset(folder, NAME, "VAL", transform=lambda image: seen.append(image) or image * 2)
    image, caption, caplen, all_captions = dataset[6]  # caption 1 of image 1
    assert all_captions.shape == (CPI, MAX_LEN + 2) and all_captions.tolist() == captions[CPI:2 * CPI]
    assert torch.allclose(seen[0], torch.from_numpy(images[1]).float() / 255)
    assert torch.equal(image, seen[0] * 2)


def test_image_captions_dataset_gives_one_item_per_image(folder):
    images, captions, caplens = stored(folder, "TEST")
    dataset = datasets.ImageCaptionsDataset(folder, NAME, "TEST")
    assert len(dataset) == len(images) and dataset.captions_per_image == CPI
    image, image_captions, image_caplens = dataset[2]
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(images[2]))
    assert image_captions.dtype == torch.long and image_captions.tolist() == captions[2 * CPI:3 * CPI]
    assert image_caplens.dtype == torch.long and image_caplens.tolist() == caplens[2 * CPI:3 * CPI]


def test_image_captions_dataset_reads_a_features_file(folder, tmp_path):
    features = np.random.default_rng(0).standard_normal((4, 9, 6)).astype(np.float16)  # (N, P, C)
    with h5py.File(tmp_path / "features.hdf5", "w") as h5:
        h5["features"] = features
    dataset = datasets.ImageCaptionsDataset(folder, NAME, "TRAIN", features_file=str(tmp_path / "features.hdf5"))
    first, _, _ = dataset[3]
    assert first.dtype == torch.float16 and torch.equal(first, torch.from_numpy(features[3]))
    with h5py.File(tmp_path / "short.hdf5", "w") as h5:
        h5["features"] = features[:3]
    with pytest.raises(ToolkitError, match="short.hdf5"):
        datasets.ImageCaptionsDataset(folder, NAME, "TRAIN", features_file=str(tmp_path / "short.hdf5"))


def item_key(item):
    """A hashable fingerprint of one item (image bytes and captions)."""
    return tuple(tuple(tensor.flatten().tolist()) for tensor in item[:3])


@pytest.mark.parametrize("dataset_class", [datasets.CaptionDataset, datasets.ImageCaptionsDataset])
def test_dataloader_with_two_workers_yields_every_item_once(folder, dataset_class):
    dataset = dataset_class(folder, NAME, "TRAIN")
    dataset[0]  # the parent opens its HDF5 handle first: forked workers must not reuse it
    expected = collections.Counter(item_key(dataset[index]) for index in range(len(dataset)))
    loader = DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    seen = collections.Counter(item_key(item) for batch in loader for item in zip(*batch))
    assert seen == expected and sum(seen.values()) == len(dataset)


def test_dataset_pickles_without_its_hdf5_handle(folder):
    dataset = datasets.ImageCaptionsDataset(folder, NAME, "VAL")
    image = dataset[1][0]
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawn/forkserver DataLoader worker receives
    assert torch.equal(copy[1][0], image)


def test_references_come_from_the_refs_file(folder):
    word_map = datasets.load_word_map(folder, NAME)
    with open(datasets.data_paths(folder, NAME, "VAL")["refs"]) as file:
        refs = json.load(file)
    references = datasets.load_references(folder, NAME, "VAL", word_map)
    assert not references.fallback
    assert references.image_ids == [entry["image_id"] for entry in refs] and references.image_ids[0] == "0004_P.png"
    assert references.references == [entry["references"] for entry in refs]
    assert any(word.startswith("rare") for tokens in references.references[0] for word in tokens)  # not <unk>


def test_course_made_folder_without_refs_falls_back_to_decoded_captions(folder, tmp_path):
    for name in os.listdir(folder):
        if "_REFS_" not in name:
            shutil.copy(os.path.join(folder, name), tmp_path / name)
    datasets.check_data_files(str(tmp_path), NAME)
    word_map = datasets.load_word_map(str(tmp_path), NAME)
    words = {index: word for word, index in word_map.items()}
    _, captions, caplens = stored(folder, "TEST")
    references = datasets.load_references(str(tmp_path), NAME, "TEST", word_map)
    assert references.fallback and references.image_ids == [0, 1, 2, 3]
    assert len(references.references) == 4 and all(len(refs) == CPI for refs in references.references)
    assert references.references[1][2] == [words[index] for index in captions[CPI + 2][1:caplens[CPI + 2] - 1]]
    words_used = {word for refs in references.references for tokens in refs for word in tokens}
    assert "<unk>" in words_used and not {"<start>", "<end>", "<pad>"} & words_used


def copy_folder(folder, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(folder, target)
    return str(target)


@pytest.mark.parametrize("word_map, problem", [
    (["a", "b"], "holds a JSON list, not an object"),
    ({"a": 1, "<start>": 2, "<end>": 3, "<pad>": 0}, "lacks the special token(s) <unk>"),
    ({"a": 1, "<unk>": 2, "<pad>": 0}, "lacks the special token(s) <start>, <end>"),
    ({"a": "1", "<start>": 2, "<end>": 3, "<unk>": 4, "<pad>": 0}, "maps 'a' to '1', not an integer id"),
])
def test_a_bad_word_map_is_refused_naming_the_file_and_the_token(folder, tmp_path, word_map, problem):
    data_folder = copy_folder(folder, tmp_path)
    path = datasets.wordmap_path(data_folder, NAME)
    with open(path, "w") as file:
        json.dump(word_map, file)
    with pytest.raises(ToolkitError, match=re.escape(f"word map {path!r} {problem}")) as error:
        datasets.load_word_map(data_folder, NAME)
    assert "create_input_files.py --dataset flickr8k" in str(error.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_truncated_or_foreign_images_file_names_the_file_and_the_command(folder, tmp_path, damage):
    data_folder = copy_folder(folder, tmp_path)
    path = datasets.data_paths(data_folder, NAME, "TRAIN")["images"]
    with open(path, "rb") as file:
        content = file.read()
    with open(path, "wb") as file:
        file.write(content[:len(content) // 2] if damage == "truncate" else b"not an HDF5 file" * 100)
    with pytest.raises(ToolkitError, match=re.escape(path)) as error:
        datasets.ImageCaptionsDataset(data_folder, NAME, "TRAIN")
    assert "create_input_files.py --dataset flickr8k" in str(error.value) and "--overwrite" in str(error.value)


def test_references_carry_the_objects_of_the_refs_file(folder, tmp_path):
    data_folder = copy_folder(folder, tmp_path)
    path = datasets.data_paths(data_folder, NAME, "TEST")["refs"]
    with open(path) as file:
        refs = json.load(file)
    objects = [{"words": ["small", "red", "circle"], "box": [0.1, 0.2, 0.3, 0.4]}]
    refs[1]["objects"] = objects
    with open(path, "w") as file:
        json.dump(refs, file)
    references = datasets.load_references(data_folder, NAME, "TEST", datasets.load_word_map(data_folder, NAME))
    assert references.objects == [None, objects, None, None]
    os.remove(path)  # a course-made folder: no objects
    fallback = datasets.load_references(data_folder, NAME, "TEST", datasets.load_word_map(data_folder, NAME))
    assert fallback.fallback and fallback.objects == [None] * 4
