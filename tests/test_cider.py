"""cider.py: CIDEr-D equals coco-caption's on the set it scores, by hand on small cases, and takes its
document frequencies from its corpus only."""
import math
import random

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from cider import CiderD
from utils import ToolkitError


def random_sentence(rng, vocab, shortest=0, longest=12):
    return [rng.randrange(vocab) for _ in range(rng.randint(shortest, longest))]


def random_set(seed, images=30, vocab=9):
    """Candidates and 1 to 6 references per image over a small vocabulary (many shared n-grams),
    lengths 0 to 12 (the single-word and empty cases of the length penalty included)."""
    rng = random.Random(seed)
    references = [[random_sentence(rng, vocab, shortest=1) for _ in range(rng.randint(1, 6))] for _ in range(images)]
    candidates = [random_sentence(rng, vocab) for _ in range(images)]
    candidates[0] = list(references[0][0])  # an exact copy of a reference
    candidates[1] = [references[1][0][0]]  # a single word
    return candidates, references


def coco_cider(candidates, references):
    """pycocoevalcap's CIDEr-D of id sequences written as words: (mean, per image)."""
    def text(ids):
        return " ".join(f"w{i}" for i in ids)
    gts = {image: [text(ref) for ref in refs] for image, refs in enumerate(references)}
    res = {image: [text(candidate)] for image, candidate in enumerate(candidates)}
    return Cider().compute_score(gts, res)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocoevalcap_given_the_scored_sets_document_frequencies(seed):
    candidates, references = random_set(seed)
    expected_mean, expected = coco_cider(candidates, references)
    reward = CiderD(references)  # the scored set's references as the corpus: coco-caption's df
    by_index = reward.scores(candidates, list(range(len(candidates))))
    by_references = reward.scores(candidates, references)
    np.testing.assert_allclose(by_index, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_references, expected, rtol=0, atol=1e-6)
    assert abs(by_index.mean() - expected_mean) < 1e-6
    assert expected.max() > 1.0  # the set has real matches, not only zeros


def test_several_candidates_per_image_in_any_order_as_lists_or_tensors():
    candidates, references = random_set(3)
    reward = CiderD(references)
    single = reward.scores(candidates, np.arange(len(candidates)))
    rng = random.Random(0)
    images = [rng.randrange(len(candidates)) for _ in range(100)]  # repeats, shuffled
    scores = reward.scores([torch.tensor(candidates[i], dtype=torch.long) for i in images], torch.tensor(images))
    np.testing.assert_allclose(scores, single[images], rtol=0, atol=1e-12)


def hand_corpus():
    """Four images; word 1 is in two of them (idf log 2), words 2..8 in one (idf log 4)."""
    return [[[1, 2, 3, 4]], [[5, 6, 7, 8]], [[1, 5]], [[6]]]


def test_hand_made_scores():
    reward = CiderD(hand_corpus())
    scores = reward.scores([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2], [1, 1, 1, 1], []], [0, 1, 0, 0, 0])
    assert scores[0] == pytest.approx(10.0)  # every order's cosine is 1
    assert scores[1] == 0.0  # nothing shared
    # "1 2" against "1 2 3 4": unigram cosine (log2 log2 + log4 log4) / (|(log2, log4)| |(log2, log4, log4, log4)|),
    # bigram cosine 1 / sqrt(3), no 3- or 4-grams; bigram counts 1 and 3 -> delta 2.
    l2, l4 = math.log(2), math.log(4)
    unigram = (l2 ** 2 + l4 ** 2) / (math.sqrt(l2 ** 2 + l4 ** 2) * math.sqrt(l2 ** 2 + 3 * l4 ** 2))
    expected = 10 * (unigram + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    assert scores[2] == pytest.approx(expected, abs=1e-12)
    # "1 1 1 1": its count 4 of word 1 is clipped to the reference's 1; bigram counts 3 and 3.
    clipped_unigram = l2 * l2 / (4 * l2 * math.sqrt(l2 ** 2 + 3 * l4 ** 2))
    assert scores[3] == pytest.approx(10 * clipped_unigram / 4, abs=1e-12)
    assert scores[4] == 0.0  # the empty caption
    np.testing.assert_array_equal(reward.scores([[], [8]], [0, 0]), [0.0, 0.0])  # a batch without any match
    assert CiderD([[[1, 2]]]).scores([[1, 2]], [0])[0] == 0.0  # one document: every idf is log 1 - log 1 = 0


def test_document_frequencies_come_from_the_corpus_only():
    reward = CiderD(hand_corpus(), vocab_size=10)
    # Scored alone against references outside the corpus: word 1 keeps its corpus df (2 of 4 images),
    # word 9, absent from the corpus, gets the largest idf, log 4. coco-caption would use this one image.
    score = reward.scores([[9]], [[[1, 9]]])[0]
    l2, l4 = math.log(2), math.log(4)
    expected = 10 * (l4 / math.sqrt(l2 ** 2 + l4 ** 2)) / 4 * math.exp(-1 / 72)  # bigram counts 0 and 1
    assert score == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(reward.idf(reward.count_ngrams([[9], [1], [2]]).codes), [l4, l2, l4], atol=1e-12)
    # The score of a batch does not depend on what else is in it.
    together = reward.scores([[9], [1, 2, 3], [5, 6]], [[[1, 9]], [[1, 2, 3, 4]], [[5, 6, 7, 8]]])
    assert together[0] == pytest.approx(score, abs=1e-12)


def test_bad_inputs_are_named():
    reward = CiderD(hand_corpus())
    with pytest.raises(ValueError, match="word ids must lie in"):
        reward.scores([[12]], [0])
    with pytest.raises(ValueError, match="image indices"):
        reward.scores([[1]], [4])
    with pytest.raises(ValueError, match="2 candidates but 1"):
        reward.scores([[1], [2]], [0])
    with pytest.raises(ValueError, match="no reference"):
        reward.scores([[1]], [[]])


def test_counting_in_chunks_changes_nothing(monkeypatch):
    candidates, references = random_set(4)
    whole = CiderD(references).scores(candidates, references)
    monkeypatch.setattr("cider.COUNT_CHUNK", 7)
    np.testing.assert_array_equal(CiderD(references).scores(candidates, references), whole)


def test_a_vocabulary_too_large_for_the_codes_is_a_toolkit_error():
    with pytest.raises(ToolkitError, match="raise min_word_freq"):
        CiderD(hand_corpus(), vocab_size=60_000)
