"""SCST's CLIP-S reward (clip_reward.py): CLIP-S by hand on a tiny open_clip model, its sum with CIDEr-D, an SCST
run with it, and the cfg's refusals before any training."""
import math
import os

import h5py
import numpy as np
import open_clip
import pytest
import torch

import clip_score
import config
import solver
import training
from checkpoints import load_checkpoint
from cider import CiderD
from clip_reward import CiderClipReward, ClipReward
from clip_score import ClipScorer
from conftest import hand_embeddings, tiny_cfg
from data_files import data_paths
from datasets import load_word_map
from training_stages import encoded_references
from utils import ToolkitError

IMAGE_INDICES = [0, 1, 0, 7, 23]  # image 0 twice


@pytest.fixture(scope="module")
def word_map(tiny_shapes):
    return load_word_map(tiny_shapes.folder, tiny_shapes.data_name)


@pytest.fixture(scope="module")
def clip_reward(tiny_shapes, tiny_clip, word_map):
    return ClipReward.from_split(ClipScorer(*tiny_clip), tiny_shapes.folder, tiny_shapes.data_name, word_map)


def candidates_and_texts(word_map):
    """Five id sequences (with <start>, <end> and <pad> in two, one empty) and the texts they stand for."""
    texts = ["a big blue square", "a small green triangle", "red", "", "green triangle on a grey background"]
    candidates = [[word_map[word] for word in text.split()] for text in texts]
    candidates[1] = [word_map["<start>"], *candidates[1], word_map["<end>"]]
    candidates[4] = [*candidates[4], word_map["<end>"], word_map["<pad>"]]
    return candidates, texts


def test_the_reward_is_clip_s_of_each_caption_with_its_train_image_by_hand(tiny_shapes, tiny_clip, word_map,
                                                                           clip_reward):
    model, tokenizer = tiny_clip
    candidates, texts = candidates_and_texts(word_map)
    with h5py.File(data_paths(tiny_shapes.folder, tiny_shapes.data_name, "TRAIN")["images"], "r") as h5:
        images = torch.from_numpy(h5["images"][:])  # (24, 3, 64, 64)
    image, text = hand_embeddings(model, tokenizer, images, texts)  # (24, D), (5, D)
    expected = 2.5 * (image[IMAGE_INDICES] * text).sum(-1).clamp(min=0)  # (5,)

    scores = clip_reward.scores(candidates, torch.tensor(IMAGE_INDICES))
    assert clip_reward.image_embeddings.shape == (24, 16)
    assert scores.dtype == np.float64 and scores.shape == (5,)
    np.testing.assert_allclose(scores, expected.double().numpy(), rtol=0, atol=1e-5)
    assert (expected > 0).sum() == 4 and expected[0] == 0 and scores[2] > 0  # both sides of max(cos, 0); image 0 twice


def test_cider_plus_clips_adds_the_weighted_clip_s_to_cider_d(tiny_shapes, word_map, clip_reward):
    cider = CiderD(encoded_references(tiny_shapes.folder, tiny_shapes.data_name, "TRAIN", word_map),
                   vocab_size=len(word_map))
    candidates, _ = candidates_and_texts(word_map)
    plain, clips = cider.scores(candidates, IMAGE_INDICES), clip_reward.scores(candidates, IMAGE_INDICES)
    np.testing.assert_array_equal(CiderClipReward(cider, clip_reward, 0.0).scores(candidates, IMAGE_INDICES), plain)
    summed = CiderClipReward(cider, clip_reward, 0.5).scores(candidates, IMAGE_INDICES)
    assert summed.dtype == np.float64
    np.testing.assert_allclose(summed, plain + 0.5 * clips, rtol=0, atol=1e-12)
    assert clips.sum() > 0 and not np.array_equal(summed, plain)


# ---------------------------------------------------------------- in an SCST run

@pytest.fixture(scope="module")
def xe_checkpoint(tiny_shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("xe")
    result = solver.train(tiny_cfg(tiny_shapes, folder, decoder="attention", epochs=1, decoder_lr=3e-2))
    return result["best_checkpoint"]


def scst_cfg(data, folder, checkpoint, **overrides):
    """One SCST epoch from `checkpoint`, reading the features cached by its run."""
    return tiny_cfg(data, folder, decoder="attention", training="scst", checkpoint=checkpoint, scst_lr=1e-3,
                    deterministic=True, cache_folder=os.path.dirname(checkpoint), **overrides)


def test_an_scst_run_with_the_clip_reward_logs_another_reward_and_cider_alone_is_the_default(
        tiny_shapes, tiny_clip, clip_reward, xe_checkpoint, tmp_path):
    clip_file = tmp_path / "tiny-test-clip.pt"
    torch.save(tiny_clip[0].state_dict(), clip_file)
    default = solver.train(scst_cfg(tiny_shapes, tmp_path / "default", xe_checkpoint))
    cider = solver.train(scst_cfg(tiny_shapes, tmp_path / "cider", xe_checkpoint, scst_reward="cider"))
    trainer = training.Trainer(config.validate_cfg(scst_cfg(
        tiny_shapes, tmp_path / "clips", xe_checkpoint, scst_reward="cider+clips", clip_reward_weight=1.0,
        clip_reward_model=f"tiny-test-clip:{clip_file}")))
    assert isinstance(trainer.stage.reward, CiderClipReward)
    # every TRAIN image, embedded once by the weights of the file
    torch.testing.assert_close(trainer.stage.reward.clip.image_embeddings, clip_reward.image_embeddings)
    clips = trainer.run()

    assert cider["history"]["train_reward"] == default["history"]["train_reward"]
    assert cider["history"]["val_cider"] == default["history"]["val_cider"]
    assert len(clips["history"]["train_reward"]) == 1 and math.isfinite(clips["history"]["train_reward"][0])
    # the same first samples, plus 1.0 x CLIP-S >= 0: 0.487 against 0.238 here
    assert clips["history"]["train_reward"][0] > cider["history"]["train_reward"][0]
    assert load_checkpoint(clips["last_checkpoint"])["cfg"]["scst_reward"] == "cider+clips"


# ---------------------------------------------------------------- refused before training

@pytest.mark.parametrize("key, value, message", [
    ("scst_reward", "clips", r"cfg\['scst_reward'\] = 'clips' is not one of cider, cider\+clips"),
    ("clip_reward_weight", -0.5, r"cfg\['clip_reward_weight'\] = -0.5 must be a finite weight, 0 or more"),
    ("clip_reward_weight", math.inf, r"cfg\['clip_reward_weight'\] = inf must be a finite weight"),
    ("clip_reward_weight", math.nan, r"cfg\['clip_reward_weight'\] = nan must be a finite weight")])
def test_bad_reward_keys_are_refused(tiny_shapes, xe_checkpoint, tmp_path, key, value, message):
    with pytest.raises(ToolkitError, match=message):
        solver.train(scst_cfg(tiny_shapes, tmp_path / "out", xe_checkpoint, **{key: value}))
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture
def offline(monkeypatch):
    """No CLIP weights in Hugging Face's cache, and nothing built or downloaded."""
    monkeypatch.setattr(clip_score, "cached_weights_file", lambda name, tag: None)
    monkeypatch.setattr(open_clip, "create_model", pytest.fail)


@pytest.mark.parametrize("spec, message", [
    ("ViT-B-32:openai", r"clip_reward_model 'ViT-B-32:openai': the ViT-B-32 weights 'openai' are not in Hugging "
                        r"Face's cache .* fetch them once with internet"),
    ("ViT-B-32", r"clip_reward_model 'ViT-B-32' names no model or no weights")])
def test_clip_weights_not_at_hand_are_refused_before_training(tiny_shapes, xe_checkpoint, tmp_path, offline, spec,
                                                              message):
    with pytest.raises(ToolkitError, match=message):
        solver.train(scst_cfg(tiny_shapes, tmp_path / "out", xe_checkpoint, scst_reward="cider+clips",
                              clip_reward_model=spec))
    assert not os.path.exists(tmp_path / "out")


def test_the_reward_keys_change_nothing_in_cross_entropy_training(tiny_shapes, tmp_path, offline):
    options = {"scst_reward": "cider+clips", "clip_reward_model": "ViT-B-32:openai", "clip_reward_weight": 2}
    cfg = config.validate_cfg(tiny_cfg(tiny_shapes, tmp_path, **options))
    assert cfg["training"] == "xe" and {key: cfg[key] for key in options} == options
