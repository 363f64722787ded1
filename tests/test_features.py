"""The frozen encoder's feature cache: equal to live features, rebuilt when stale, never read partial."""
import os
import re
import shutil
from collections import namedtuple

import h5py
import numpy as np
import pytest
import torch

import features
import config
import training
import solver
import utils
from conftest import tiny_cfg
from data_files import data_paths, feature_cache_path
from datasets import ImageCaptionsDataset
from images import normalize_images
from models import Encoder
from utils import ToolkitError


@pytest.fixture
def data(tiny_shapes, tmp_path):
    """A private copy of the tiny data (some tests touch its files)."""
    folder = tmp_path / "data"
    shutil.copytree(tiny_shapes.folder, folder)
    return type(tiny_shapes)(str(folder), tiny_shapes.data_name)


def encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(4, "resnet18", weights=None).eval()


def build(encoder_, data, cache_folder):
    return features.ensure_feature_cache(encoder_, data.folder, data.data_name, "VAL", str(cache_folder))


def test_cached_features_equal_live_ones_within_float16(data, tmp_path):
    model = encoder()
    path = build(model, data, tmp_path)
    assert os.path.basename(path) == f"VAL_FEATURES_{data.data_name}_resnet18.hdf5"
    dataset = ImageCaptionsDataset(data.folder, data.data_name, "VAL", features_file=path)
    images = ImageCaptionsDataset(data.folder, data.data_name, "VAL")
    assert len(dataset) == len(images) == 8
    for index in (0, 5):
        cached, _, _ = dataset[index]
        assert cached.dtype == torch.float16 and cached.shape == (16, 512)
        with torch.no_grad():
            live = model(normalize_images(images[index][0].unsqueeze(0)))[0].reshape(16, 512)
        torch.testing.assert_close(cached.float(), live, rtol=2e-3, atol=1e-3)


def test_valid_cache_is_reused_and_stale_one_rebuilt(data, tmp_path, monkeypatch):
    builds = []
    real_build = features.build_feature_cache
    monkeypatch.setattr(features, "build_feature_cache", lambda *args: builds.append(args[4]) or real_build(*args))
    path = build(encoder(0), data, tmp_path)
    first = features.read_features(path, 0)
    build(encoder(0), data, tmp_path)
    assert len(builds) == 1  # same weights, same images: reused
    build(encoder(1), data, tmp_path)  # other weights
    assert len(builds) == 2
    assert not np.array_equal(features.read_features(path, 0), first)
    images_file = data_paths(data.folder, data.data_name, "VAL")["images"]
    stat = os.stat(images_file)
    os.utime(images_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the data changed
    build(encoder(1), data, tmp_path)
    assert len(builds) == 3
    other_grid = Encoder(2, "resnet18", weights=None).eval()
    other_grid.load_state_dict(encoder(1).state_dict())
    build(other_grid, data, tmp_path)  # same weights, another grid size
    assert len(builds) == 4
    assert features.read_features(path, 0).shape == (4, 512)


def test_an_interrupted_build_leaves_nothing_behind(data, tmp_path, monkeypatch):
    model = encoder()
    calls = {"n": 0}
    real_forward = model.forward

    def interrupted(images):
        calls["n"] += 1
        if calls["n"] > 2:  # the shape probe and the first batch went through
            raise KeyboardInterrupt
        return real_forward(images)

    monkeypatch.setattr(model, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        features.ensure_feature_cache(model, data.folder, data.data_name, "VAL", str(tmp_path), batch_size=2)
    assert os.listdir(tmp_path) == ["data"]


def test_a_partial_or_foreign_file_is_never_read(data, tmp_path):
    model = encoder()
    path = feature_cache_path(str(tmp_path), data.data_name, "VAL", "resnet18")
    with h5py.File(path, "w") as h5:  # what a crash inside h5py could leave: no fingerprint
        h5.create_dataset("features", data=np.zeros((8, 16, 512), dtype="float16"))
    assert build(model, data, tmp_path) == path
    assert np.abs(features.read_features(path, 0)).sum() > 0
    with open(path, "wb") as file:
        file.write(b"truncated")
    build(model, data, tmp_path)
    assert np.abs(features.read_features(path, 0)).sum() > 0


def test_refuses_when_the_disk_is_too_small(data, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    needed = 8 * 16 * 512 * 2  # images x positions x channels x float16
    with pytest.raises(ToolkitError, match=rf"VAL feature cache needs {utils.format_bytes(needed)} plus 1\.1 GB kept "
                                           rf"free but .* has only 1\.0 kB free.*cache_folder"):
        build(encoder(), data, tmp_path)
    assert os.listdir(tmp_path) == ["data"]


def test_training_reads_the_cache_only_with_a_frozen_encoder(data, tmp_path):
    frozen = training.Trainer(config.validate_cfg(tiny_cfg(data, tmp_path / "a")))
    assert frozen.train_loader.dataset.features_file.endswith("TRAIN_FEATURES_" + data.data_name + "_resnet18.hdf5")
    assert frozen.val_loader.dataset.features_file.endswith("VAL_FEATURES_" + data.data_name + "_resnet18.hdf5")
    tuned = training.Trainer(config.validate_cfg(tiny_cfg(data, tmp_path / "b", fine_tune_encoder=True)))
    assert tuned.train_loader.dataset.features_file is None
    assert tuned.encoder_optimizer is not None


def test_cache_features_command_builds_both_splits(data, tmp_path, capsys):
    solver.main(["cache-features", "--data-folder", data.folder, "--data-name", data.data_name, "--encoder",
                 "resnet18", "--encoder-weights", "none", "--encoded-image-size", "4", "--workers", "0",
                 "--cache-folder", str(tmp_path / "cache"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "float16 = " in printed and " kB in " in printed  # the size is announced before the work
    assert sorted(os.listdir(tmp_path / "cache")) == [f"TRAIN_FEATURES_{data.data_name}_resnet18.hdf5",
                                                      f"VAL_FEATURES_{data.data_name}_resnet18.hdf5"]


def count_builds(monkeypatch):
    builds = []
    real_build = features.build_feature_cache
    monkeypatch.setattr(features, "build_feature_cache", lambda *args: builds.append(args[4]) or real_build(*args))
    return builds


def zero_first_row(path):
    with h5py.File(path, "r+") as h5:
        h5["features"][0] = 0


def nan_in_last_row(path):
    with h5py.File(path, "r+") as h5:
        h5["features"][-1, 3, 7] = np.nan


def random_bytes_in_the_middle(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.seek(size // 2)
        file.write(np.random.default_rng(0).bytes(size // 8))


@pytest.mark.parametrize("damage", [zero_first_row, nan_in_last_row, random_bytes_in_the_middle])
def test_a_cache_damaged_after_it_was_built_is_rebuilt(data, tmp_path, monkeypatch, capsys, damage):
    builds = count_builds(monkeypatch)
    path = build(encoder(), data, tmp_path)
    good = [features.read_features(path, index) for index in range(8)]
    damage(path)
    capsys.readouterr()
    assert build(encoder(), data, tmp_path) == path and len(builds) == 2
    assert f"Rebuilding the feature cache {path!r}" in capsys.readouterr().out
    assert all(np.array_equal(features.read_features(path, index), row) for index, row in enumerate(good))


def test_an_encoder_with_non_finite_features_is_named_not_the_learning_rate(data, tmp_path, monkeypatch):
    model = encoder()
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda images: real_forward(images) * 1e9)  # beyond float16's 65504
    with pytest.raises(ToolkitError, match=r"frozen resnet18 encoder gives unusable features: those of VAL image 0 "
                                           r"are not finite .*randomly initialised backbone.*use pretrained weights"):
        build(model, data, tmp_path)
    assert os.listdir(tmp_path) == ["data"]


@pytest.mark.parametrize("split", ["TRAIN", "VAL"])
def test_a_truncated_images_file_names_the_file_and_the_command(data, tmp_path, split):
    path = data_paths(data.folder, data.data_name, split)["images"]
    with open(path, "rb") as file:
        content = file.read()
    with open(path, "wb") as file:
        file.write(content[:len(content) // 3])
    with pytest.raises(ToolkitError, match=re.escape(repr(path))) as error:
        features.ensure_feature_cache(encoder(), data.folder, data.data_name, split, str(tmp_path))
    assert "python create_input_files.py --dataset shapes" in str(error.value)


def test_a_killed_build_s_leftover_is_removed_by_the_next_build(data, tmp_path, capsys):
    leftover = tmp_path / f".VAL_FEATURES_{data.data_name}_resnet18.hdf5.999999999.abcd.tmp"  # no such pid
    leftover.write_bytes(b"half a cache")
    build(encoder(), data, tmp_path)
    assert not leftover.exists() and "removed 1 temporary file(s)" in capsys.readouterr().out
