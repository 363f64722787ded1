"""CLIP-S and RefCLIP-S: the formulas by hand, on a tiny open_clip model built without weights, and the skip without
weights or open_clip."""
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

import clip_score
from clip_score import ClipScorer, clip_s, clip_scores, refclip_s
from conftest import hand_embeddings
from utils import ToolkitError


def test_clip_s_is_2_5_times_the_positive_cosine():
    images = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    captions = F.normalize(torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]), dim=-1)
    torch.testing.assert_close(clip_s(images, captions), torch.tensor([2.5 * 0.5 ** 0.5, 0.0, 2.5]))


def test_refclip_s_is_the_harmonic_mean_with_the_best_reference():
    captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    references = torch.tensor([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])  # cos 0.6, 1.0 | -1 | -1
    reference_image = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([2.0, 1.0, 0.0])
    expected = torch.tensor([2 * 2.0 * 1.0 / (2.0 + 1.0), 0.0, 0.0])  # best reference 1.0; negative -> 0
    torch.testing.assert_close(refclip_s(scores, captions, references, reference_image), expected)


def test_scores_match_the_cosine_formulas_by_hand(tiny_clip):
    model, tokenizer = tiny_clip
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    captions = ["a red circle", "two blue squares"]
    references = [["a red circle on grey", "one circle"], ["blue squares", "two squares", "a triangle"]]
    scores = ClipScorer(model, tokenizer).scores([images[:1], images[1:]], captions, references)

    image, text = hand_embeddings(model, tokenizer, images, captions + [r for rs in references for r in rs])
    caption, refs = text[:2], {0: text[2:4], 1: text[4:]}
    per_image = [2.5 * max(float(image[i] @ caption[i]), 0.0) for i in range(2)]
    best = [max(max(float(caption[i] @ r) for r in refs[i]), 0.0) for i in range(2)]
    harmonic = [2 * c * b / (c + b) if c + b > 0 else 0.0 for c, b in zip(per_image, best)]
    assert scores["clip_s"] == pytest.approx(sum(per_image) / 2, abs=1e-5)
    assert scores["refclip_s"] == pytest.approx(sum(harmonic) / 2, abs=1e-5)


def test_without_cached_weights_the_scores_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(clip_score, "cached_weights_file", lambda name, tag: None)
    monkeypatch.setattr(open_clip, "create_model", pytest.fail)  # nothing is built, nothing downloaded
    result = clip_scores("ViT-B-32:openai", iter(()), ["a cat"], [["a cat"]], "cpu")
    assert result["scores"] == {}
    note = result["unavailable"]["clip_scores"]
    assert "clip_metric_model 'ViT-B-32:openai'" in note and "cache" in note and "\n" not in note


def test_without_open_clip_the_note_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    result = clip_scores("ViT-B-32:openai", iter(()), ["a cat"], [["a cat"]], "cpu")
    assert "pip install open-clip-torch" in result["unavailable"]["clip_scores"]


@pytest.mark.parametrize("spec, message", [("ViT-B-32:no_such_tag", "openai"), ("No-Such-Model:openai", "no model"),
                                           ("ViT-B-32", "e.g. ViT-B-32:openai")])
def test_bad_model_or_weights_are_named(spec, message):
    with pytest.raises(ToolkitError, match=message):
        clip_score.load_scorer(spec, "cpu")
