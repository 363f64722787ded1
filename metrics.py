"""Caption metrics: the course's BLEU (nltk) and the coco-caption metrics papers report (pycocoevalcap).

Every metric has one key, used in result dicts, checkpoints and
tables, and one printed label (METRIC_LABELS). A merged dict is `{**course_bleu(...), **coco["scores"]}`.

    key                      label                  what it is
    bleu1 .. bleu4           BLEU-1 .. BLEU-4       the course's BLEU: nltk corpus_bleu, cumulative weights,
                                                    no smoothing, on the toolkit's own tokens
    coco_bleu1 .. coco_bleu4 COCO-BLEU-1 .. 4       coco-caption's BLEU (pycocoevalcap Bleu, closest length)
    meteor                   METEOR                 METEOR 1.5 (Java)
    rouge_l                  ROUGE-L                ROUGE-L, beta 1.2
    cider                    CIDEr                  coco-caption's CIDEr-D (idf over the scored images)
    spice                    SPICE                  never run: always listed as unavailable
    clip_s, refclip_s        CLIP-S, RefCLIP-S      CLIPScore and RefCLIPScore (clip_score.py), 0 to 2.5 (papers: x 100)
    clip_scores              CLIP-S / RefCLIP-S     not a score: both listed as unavailable without the CLIP weights
    ptb_tokenizer            PTB tokenizer          not a score: the tokenizer of the coco-caption scores, "java"
                                                    (pycocoevalcap's Stanford CoreNLP) or "python" (ptb_tokenizer.py)
    chair_i, chair_s         CHAIR-i, CHAIR-s       object hallucination (chair.py), on data that lists each
                                                    image's objects; lower is better
    chair                    CHAIR                  not a score: listed as unavailable without object lists
    peak_in_box, mass_in_box, uniform_mass_in_box, beta_object_words, beta_function_words
                                                    grounding (grounding.py), on data with object boxes

results_table sets the scores of several runs side by side, in that order.
"""
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import ptb_tokenizer
from utils import ToolkitError, markdown_table

# nltk takes seconds to import: course_bleu imports it when it first runs.

COURSE_BLEU_WEIGHTS = {"bleu1": (1.0,), "bleu2": (1 / 2,) * 2, "bleu3": (1 / 3,) * 3, "bleu4": (1 / 4,) * 4}
COCO_BLEU_KEYS = ("coco_bleu1", "coco_bleu2", "coco_bleu3", "coco_bleu4")
METRIC_LABELS = {
    "bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
    "coco_bleu1": "COCO-BLEU-1", "coco_bleu2": "COCO-BLEU-2", "coco_bleu3": "COCO-BLEU-3",
    "coco_bleu4": "COCO-BLEU-4",
    "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE",
    "ptb_tokenizer": "PTB tokenizer",
    "clip_s": "CLIP-S", "refclip_s": "RefCLIP-S", "clip_scores": "CLIP-S / RefCLIP-S",
    "chair_i": "CHAIR-i", "chair_s": "CHAIR-s", "chair": "CHAIR",
    "peak_in_box": "attention peak in box", "mass_in_box": "attention mass in box",
    "uniform_mass_in_box": "uniform mass in box", "beta_object_words": "beta (object words)",
    "beta_function_words": "beta (function words)",
}
TOKENIZERS = ("java", "python")  # coco-caption's PTB tokenizer: pycocoevalcap's (Java), or ptb_tokenizer.py
SPICE_REASON = ("not run: SPICE needs Stanford CoreNLP models that pycocoevalcap downloads at run time, "
                "and this toolkit scores offline")


class _JavaFailure(Exception):
    """A Java-based part of coco-caption could not run; the message says why."""


def course_bleu(references, hypotheses):
    """The course's BLEU-1..4 as {"bleu1": .., ..., "bleu4": ..}: nltk corpus_bleu, no smoothing.

    references[i] is the list of reference token lists of image i, hypotheses[i] its predicted token list.
    """
    if not hypotheses:
        raise ToolkitError("no captions to score: the list of predicted captions is empty "
                           "(is the split empty?)")
    if len(references) != len(hypotheses):
        raise ToolkitError(f"BLEU needs one list of references per predicted caption, got "
                           f"{len(references)} reference lists for {len(hypotheses)} predictions")
    without_references = [index for index, image_references in enumerate(references) if not image_references]
    if without_references:
        raise ToolkitError(f"image {without_references[0]} (0-based, in prediction order) has no reference "
                           f"captions; every image needs at least one to be scored")
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():  # nltk warns for every order without a match; a score of 0 says it
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(references, hypotheses, weights=list(COURSE_BLEU_WEIGHTS.values()))
    return {key: float(score) for key, score in zip(COURSE_BLEU_WEIGHTS, scores)}


def coco_caption_metrics(predictions, references, tokenizer=None):
    """coco-caption's BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of {image_id: caption} against
    {image_id: [every reference caption]}, both already tokenised (tokens joined by spaces).

    `tokenizer` is coco-caption's PTB tokenizer: "java" (pycocoevalcap's), "python" (ptb_tokenizer.py, the
    same tokens) or None: java when it runs, else python. Returns {"scores": {key: value}, "unavailable":
    {key: reason}, "tokenizer": the one that ran}. SPICE is always unavailable; without Java, METEOR is too.
    """
    _check_coco_inputs(predictions, references)
    check_tokenizer(tokenizer)
    gts, res, used_tokenizer = _tokenize_for_coco(predictions, references, tokenizer)
    unavailable = {}
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {key: float(score) for key, score in zip(COCO_BLEU_KEYS, coco_bleu)}
    try:
        scores["meteor"] = _meteor_score(gts, res)
    except _JavaFailure as failure:
        unavailable["meteor"] = str(failure)
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    unavailable["spice"] = SPICE_REASON
    return {"scores": scores, "unavailable": unavailable, "tokenizer": used_tokenizer}


def check_tokenizer(tokenizer):
    """Raise ToolkitError unless `tokenizer` is None, "python", or "java" with a working Java."""
    if tokenizer is not None and tokenizer not in TOKENIZERS:
        raise ToolkitError(f"unknown PTB tokenizer {tokenizer!r}: choose one of {', '.join(TOKENIZERS)} "
                           f"(or None: java when it runs, else python)")
    if tokenizer == "java" and java_unavailable_reason():
        raise ToolkitError(f"the Java PTB tokenizer cannot run: {java_unavailable_reason()}; "
                           f"the python tokenizer gives the same tokens (tokenizer python)")


def format_metrics(scores, unavailable=None):
    """Printable lines such as `CIDEr: 0.1234` for each score (`PTB tokenizer: python` for a text), in the
    dict's order, then `SPICE: unavailable (reason)` for each entry of `unavailable` (keys as in the module
    docstring)."""
    lines = [f"{METRIC_LABELS[key]}: {value if isinstance(value, str) else format(value, '.4f')}"
             for key, value in scores.items()]
    lines += [f"{METRIC_LABELS[key]}: unavailable ({reason})" for key, reason in (unavailable or {}).items()]
    return lines


@functools.cache
def java_unavailable_reason():
    """None when a working `java` is on PATH, else why not (checked once per process)."""
    java = shutil.which("java")
    if java is None:
        return ("Java was not found on PATH; METEOR and the PTB tokenizer need a Java runtime: install one, "
                "e.g. `apt-get install default-jre-headless`")
    try:
        check = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`{java} -version` could not run: {error}"
    if check.returncode != 0:
        return f"`{java} -version` failed with exit code {check.returncode}: {_error_summary(check.stderr)}"
    return None


def _check_coco_inputs(predictions, references):
    """Raise ToolkitError unless both dicts cover the same, non-empty set of images, each with references."""
    if not predictions:
        raise ToolkitError("no captions to score: the dict of predicted captions is empty "
                           "(is the split empty?)")
    without_references = predictions.keys() - references.keys()
    without_prediction = references.keys() - predictions.keys()
    if without_references or without_prediction:
        raise ToolkitError(f"predictions and references must cover the same images: "
                           f"{len(without_references)} predicted images have no references (e.g. "
                           f"{sorted(map(str, without_references))[:3]}), {len(without_prediction)} "
                           f"referenced images have no prediction (e.g. "
                           f"{sorted(map(str, without_prediction))[:3]})")
    empty = [image for image, image_references in references.items() if not image_references]
    if empty:
        raise ToolkitError(f"image {empty[0]!r} has an empty list of references; "
                           f"every image needs at least one")


def _tokenize_for_coco(predictions, references, tokenizer):
    """(gts, res, tokenizer that ran): references and predictions tokenised as coco-caption does, by the
    Stanford PTB tokenizer (Java) or ptb_tokenizer.py; None: Java, or Python when Java cannot run."""
    hypotheses = {image: [caption] for image, caption in predictions.items()}
    if tokenizer != "python":
        try:
            return _ptb_tokenize(references), _ptb_tokenize(hypotheses), "java"
        except _JavaFailure as failure:
            if tokenizer == "java":
                raise ToolkitError(f"the Java PTB tokenizer failed: {failure}; the python tokenizer gives "
                                   f"the same tokens (tokenizer python)") from failure
    return _python_ptb_tokenize(references), _python_ptb_tokenize(hypotheses), "python"


def _ptb_tokenize(captions_by_image):
    """{image: [caption]} -> {image: [tokenised caption]} by pycocoevalcap's PTBTokenizer (Java), silently."""
    java_problem = java_unavailable_reason()
    if java_problem:
        raise _JavaFailure(java_problem)
    tokenizer_input = {image: [{"caption": caption} for caption in captions]
                       for image, captions in captions_by_image.items()}
    with _stderr_captured() as read_stderr:  # its JVM reports "PTBTokenizer tokenized N tokens" on stderr
        try:
            tokenized = PTBTokenizer().tokenize(tokenizer_input)
        except OSError as error:  # e.g. it writes a temp file beside its jar, in site-packages
            raise _JavaFailure(f"the PTB tokenizer could not run: {error}") from error
        if _caption_counts(tokenized) != _caption_counts(captions_by_image):  # it output too few lines
            java_error = _error_summary(read_stderr()) or "it returned no output"
            raise _JavaFailure(f"the PTB tokenizer failed: {java_error}")
    return tokenized


def _caption_counts(captions_by_image):
    """{image: number of captions}."""
    return {image: len(captions) for image, captions in captions_by_image.items()}


def _python_ptb_tokenize(captions_by_image):
    """{image: [caption]} -> {image: [tokenised caption]} by ptb_tokenizer.py, the Java tokenizer's tokens."""
    return ptb_tokenizer.tokenize({image: [{"caption": caption} for caption in captions]
                                   for image, captions in captions_by_image.items()})


def _meteor_score(gts, res):
    """Corpus METEOR by pycocoevalcap's METEOR 1.5 JVM; raises _JavaFailure with the reason when it cannot."""
    java_problem = java_unavailable_reason()
    if java_problem:
        raise _JavaFailure(java_problem)
    try:
        meteor = Meteor()
    except OSError as error:
        raise _JavaFailure(f"METEOR's Java process could not start: {error}") from error
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (OSError, ValueError) as error:  # the JVM died: broken pipe, or an empty line for a score
        _stop_meteor(meteor)
        java_error = _error_summary(meteor.meteor_p.stderr.read().decode(errors="replace"))
        raise _JavaFailure(f"METEOR's Java process failed (exit code {meteor.meteor_p.returncode}): "
                           f"{java_error or f'{type(error).__name__}: {error}'}") from error
    finally:
        _stop_meteor(meteor)


def _stop_meteor(meteor):
    """Stop METEOR's JVM now. Meteor.compute_score leaves its lock held when it fails, and Meteor.__del__
    takes that lock, so it is freed here: otherwise garbage-collecting the scorer would hang forever."""
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    with contextlib.suppress(BrokenPipeError):  # unsent input to a dead JVM
        meteor.meteor_p.stdin.close()
    if meteor.lock.locked():
        meteor.lock.release()


@contextlib.contextmanager
def _stderr_captured():
    """Point file descriptor 2, which Java child processes inherit, at a temp file; yield a reader of it."""
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        def read_captured():
            capture.seek(0)
            return capture.read().decode(errors="replace")

        os.dup2(capture.fileno(), 2)
        try:
            yield read_captured
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)


def _error_summary(text):
    """The first two non-blank lines of a process's error output ('' if none): Java's error and its cause."""
    return " ".join([line.strip() for line in text.splitlines() if line.strip()][:2])


def results_table(results):
    """Test scores of several runs side by side: {run name: {metric key: value}} -> markdown.

    Columns: the known metrics in METRIC_LABELS order, then unknown keys in first-seen order, each
    only if at least one run has it; a run without a metric shows an em dash.
    """
    present = dict.fromkeys(key for metrics in results.values() for key in metrics)
    known = [key for key in METRIC_LABELS if key in present]
    keys = known + [key for key in present if key not in METRIC_LABELS]
    columns = [("run", "run")] + [(key, METRIC_LABELS.get(key, key)) for key in keys]
    rows = [{**metrics, "run": name} for name, metrics in results.items()]
    return markdown_table(rows, columns)
