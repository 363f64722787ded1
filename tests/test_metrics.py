"""Caption metrics: the course's nltk BLEU and coco-caption's metrics, checked against independent values."""
import metrics

import math
import random
import shutil

import pytest
from nltk.translate.bleu_score import corpus_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

REAL_JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(REAL_JAVA is None, reason="Java is not installed")

# Already tokenised captions, as the toolkit passes them; some upper case and punctuation tokens.
PREDICTIONS = {
    1: "A man riding a horse on the beach .",
    2: "a cat sitting on a table",
    3: "two dogs play in the snow",
    4: "a plate of food",
}
REFERENCES = {
    1: ["a man rides a brown horse on the sand", "A person riding a horse on a beach ."],
    2: ["a cat sitting on a wooden table", "the cat is on the table", "a grey cat lies on a kitchen table"],
    3: ["two dogs playing in snow", "dogs run through the snow ,"],
    4: ["a plate of food with vegetables", "food on a white plate"],
}
# What coco-caption's PTB tokenizer makes of them, written by hand: lower case, punctuation dropped.
TOKENISED_PREDICTIONS = {
    1: ["a man riding a horse on the beach"],
    2: ["a cat sitting on a table"],
    3: ["two dogs play in the snow"],
    4: ["a plate of food"],
}
TOKENISED_REFERENCES = {
    1: ["a man rides a brown horse on the sand", "a person riding a horse on a beach"],
    2: ["a cat sitting on a wooden table", "the cat is on the table", "a grey cat lies on a kitchen table"],
    3: ["two dogs playing in snow", "dogs run through the snow"],
    4: ["a plate of food with vegetables", "food on a white plate"],
}


def pure_python_scores(gts, res):
    """coco-caption's BLEU-1..4, ROUGE-L and CIDEr-D by calling pycocoevalcap's scorers directly."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"coco_bleu1": bleu[0], "coco_bleu2": bleu[1], "coco_bleu3": bleu[2], "coco_bleu4": bleu[3],
            "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}


@pytest.fixture
def java_on_path(monkeypatch, tmp_path):
    """Make PATH hold only `tmp_path`, with a `java` shell script of the given text in it (None: no java)."""
    def install(script):
        if script is not None:
            java = tmp_path / "java"
            java.write_text(script)
            java.chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        metrics.java_unavailable_reason.cache_clear()

    yield install
    metrics.java_unavailable_reason.cache_clear()  # the next caller detects the real Java again


# --- the course's BLEU ---------------------------------------------------------------------------------

def test_course_bleu_matches_hand_computation():
    references = [
        [["a", "cat", "sat", "on", "the", "mat"], ["there", "is", "a", "cat", "on", "the", "mat"]],
        [["a", "dog", "runs", "in", "the", "park"], ["the", "dog", "is", "running", "on", "grass"]],
    ]
    hypotheses = [["the", "cat", "sat", "on", "the", "mat"], ["a", "dog", "runs"]]
    # Image 1: unigrams 5/6 ("the" twice, clipped to the once of each reference), bigrams 4/5 (not
    # "the cat"), trigrams 3/4 (not "the cat sat"), 4-grams 2/3 (not "the cat sat on"); closest ref: 6 words.
    # Image 2: unigrams 3/3, bigrams 2/2, trigrams 1/1, 4-grams 0/1 (it has none, but nltk divides by at
    # least 1: max(1, count) in modified_precision); closest ref: 6 words.
    # Corpus: counts summed before dividing; 9 predicted words against 12 reference words.
    p1, p2, p3, p4 = (5 + 3) / (6 + 3), (4 + 2) / (5 + 2), (3 + 1) / (4 + 1), (2 + 0) / (3 + 1)
    brevity_penalty = math.exp(1 - 12 / 9)
    expected = {
        "bleu1": brevity_penalty * p1,
        "bleu2": brevity_penalty * (p1 * p2) ** (1 / 2),
        "bleu3": brevity_penalty * (p1 * p2 * p3) ** (1 / 3),
        "bleu4": brevity_penalty * (p1 * p2 * p3 * p4) ** (1 / 4),
    }
    assert metrics.course_bleu(references, hypotheses) == pytest.approx(expected, rel=1e-12)


def test_course_bleu_matches_nltk_called_directly():
    rng = random.Random(0)
    vocabulary = "a the man dog cat on table sitting street red bench two riding horse of with".split()

    def sentence():
        return [rng.choice(vocabulary) for _ in range(rng.randint(3, 12))]

    def near_copy(words):  # a prediction that shares some n-grams with a reference
        start = rng.randint(0, 2)
        return [rng.choice(vocabulary) if rng.random() < 0.2 else word for word in words[start:]]

    references = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(30)]
    hypotheses = [near_copy(rng.choice(image_references)) for image_references in references]
    expected = {f"bleu{n}": corpus_bleu(references, hypotheses, weights=(1 / n,) * n) for n in range(1, 5)}
    scores = metrics.course_bleu(references, hypotheses)
    assert list(scores) == ["bleu1", "bleu2", "bleu3", "bleu4"]
    assert scores == pytest.approx(expected, rel=1e-12)
    assert 0.1 < scores["bleu4"] < scores["bleu1"] < 1


@pytest.mark.parametrize("references, hypotheses, message", [
    ([], [], "empty"),
    ([[["a", "cat"]]], [["a", "cat"], ["a", "dog"]], "1 reference lists for 2 predictions"),
    ([[["a", "cat"]], []], [["a", "cat"], ["a", "dog"]], "image 1"),
])
def test_course_bleu_rejects_bad_input(references, hypotheses, message):
    with pytest.raises(metrics.ToolkitError, match=message):
        metrics.course_bleu(references, hypotheses)


def test_identical_predictions_score_one(java_on_path):
    java_on_path(None)  # coco-caption's BLEU and ROUGE-L do not need Java; skipping it keeps this test fast
    references = [[caption.split() for caption in captions] for captions in TOKENISED_REFERENCES.values()]
    assert metrics.course_bleu(references, [captions[0] for captions in references]) == pytest.approx(
        {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}, rel=1e-12)

    predictions = {image: captions[0] for image, captions in TOKENISED_REFERENCES.items()}
    scores = metrics.coco_caption_metrics(predictions, TOKENISED_REFERENCES)["scores"]
    for key in ("coco_bleu1", "coco_bleu2", "coco_bleu3", "coco_bleu4", "rouge_l"):
        assert scores[key] == pytest.approx(1.0, rel=1e-6), key  # coco's BLEU adds 1e-9 to its denominators


# --- coco-caption's metrics ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def with_java():
    """(coco_caption_metrics of the hand-made set with the real Java, pycocoevalcap's own METEOR of it).

    Each starts a METEOR JVM, which takes seconds to load its paraphrase table: they load at the same time.
    """
    if REAL_JAVA is None:
        pytest.skip("Java is not installed")
    metrics.java_unavailable_reason.cache_clear()
    direct_meteor = Meteor()  # its JVM starts loading now
    result = metrics.coco_caption_metrics(PREDICTIONS, REFERENCES)
    return result, direct_meteor.compute_score(TOKENISED_REFERENCES, TOKENISED_PREDICTIONS)[0]


@needs_java
def test_coco_metrics_equal_pycocoevalcap_scorers_called_directly(with_java):
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({image: [{"caption": caption} for caption in captions]
                              for image, captions in REFERENCES.items()})
    res = tokenizer.tokenize({image: [{"caption": caption}] for image, caption in PREDICTIONS.items()})
    assert (gts, res) == (TOKENISED_REFERENCES, TOKENISED_PREDICTIONS)

    result, direct_meteor = with_java
    expected = dict(pure_python_scores(gts, res), meteor=direct_meteor)
    scores = result["scores"]
    assert list(scores) == [*metrics.COCO_BLEU_KEYS, "meteor", "rouge_l", "cider"]
    assert scores == pytest.approx(expected, rel=1e-12)
    assert 0 < scores["meteor"] < 1 and 0 < scores["rouge_l"] < 1 and scores["cider"] > 0
    assert all(type(value) is float for value in scores.values())  # plain floats: JSON and weights_only safe
    assert list(result["unavailable"]) == ["spice"]
    assert result["tokenizer"] == "java"


SIMULATED_CRASH = "echo 'Error: simulated crash' >&2; exit 3"


@pytest.mark.parametrize("script, reason", [
    (None, "Java was not found on PATH"),
    (f"#!/bin/sh\n{SIMULATED_CRASH}\n", "-version` failed with exit code 3: Error: simulated crash"),
    (f'#!/bin/sh\n[ "$1" = -version ] && exit 0\n{SIMULATED_CRASH}\n', "Error: simulated crash"),
], ids=["missing", "broken", "crashes-when-scoring"])
def test_java_trouble_is_reported_and_the_rest_still_computed(java_on_path, script, reason):
    java_on_path(script)
    result = metrics.coco_caption_metrics(PREDICTIONS, REFERENCES)
    assert list(result["unavailable"]) == ["meteor", "spice"]
    assert reason in result["unavailable"]["meteor"]
    assert result["tokenizer"] == "python"  # ptb_tokenizer.py: the Java tokenizer's tokens (test_ptb_tokenizer.py)
    # These are the values with Java: the PTB test above proves it tokenises this set the same way.
    assert result["scores"] == pytest.approx(pure_python_scores(TOKENISED_REFERENCES, TOKENISED_PREDICTIONS),
                                             rel=1e-12)


@needs_java
def test_meteor_crash_is_reported_and_output_stays_clean(java_on_path, with_java, capfd):
    java_on_path(f'#!/bin/sh\n[ "$1" = -jar ] || exec "{REAL_JAVA}" "$@"\n{SIMULATED_CRASH}\n')
    result = metrics.coco_caption_metrics(PREDICTIONS, REFERENCES)
    assert result["unavailable"]["meteor"] == ("METEOR's Java process failed (exit code 3): "
                                               "Error: simulated crash")
    assert "ptb_tokenizer" not in result["unavailable"]
    expected = {key: value for key, value in with_java[0]["scores"].items() if key != "meteor"}
    assert result["scores"] == expected
    # No "PTBTokenizer tokenized ..." from Java, no "{'testlen': ...}" from Bleu, no ignored-exception noise.
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("script, tokenizer, message", [
    (None, "java", "the Java PTB tokenizer cannot run: Java was not found on PATH"),
    (f'#!/bin/sh\n[ "$1" = -version ] && exit 0\n{SIMULATED_CRASH}\n', "java",
     "the Java PTB tokenizer failed: the PTB tokenizer failed: Error: simulated crash"),
    (None, "perl", "unknown PTB tokenizer 'perl'"),
], ids=["missing", "crashes", "unknown"])
def test_a_tokenizer_that_cannot_run_is_refused(java_on_path, script, tokenizer, message):
    java_on_path(script)
    with pytest.raises(metrics.ToolkitError, match=message):
        metrics.coco_caption_metrics(PREDICTIONS, REFERENCES, tokenizer=tokenizer)


@pytest.mark.parametrize("predictions, references, message", [
    ({}, {}, "empty"),
    ({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]}, r"1 referenced images have no prediction \(e.g. \['2'\]\)"),
    ({1: "a cat", 2: "a dog"}, {1: ["a cat"], 2: []}, "image 2 has an empty list of references"),
])
def test_coco_metrics_reject_bad_input(predictions, references, message):
    with pytest.raises(metrics.ToolkitError, match=message):
        metrics.coco_caption_metrics(predictions, references)


# --- printing ------------------------------------------------------------------------------------------

def test_format_metrics_labels_each_bleu_unambiguously():
    scores = {"bleu1": 0.7, "bleu4": 0.25, "coco_bleu1": 0.71234, "coco_bleu4": 0.26,
              "meteor": 0.24, "rouge_l": 0.5, "cider": 0.91239}
    unavailable = {"spice": "not run offline"}
    assert metrics.format_metrics(scores, unavailable) == [
        "BLEU-1: 0.7000", "BLEU-4: 0.2500", "COCO-BLEU-1: 0.7123", "COCO-BLEU-4: 0.2600",
        "METEOR: 0.2400", "ROUGE-L: 0.5000", "CIDEr: 0.9124", "SPICE: unavailable (not run offline)",
    ]
    assert metrics.format_metrics({"cider": 0.5, "ptb_tokenizer": "python"}) == ["CIDEr: 0.5000",
                                                                                 "PTB tokenizer: python"]
    assert len(set(metrics.METRIC_LABELS.values())) == len(metrics.METRIC_LABELS)
