"""Shared helpers: user-facing errors, atomic files and disk checks, metrics and tables (figures: figures.py)."""
import contextlib
import errno
import functools
import numbers
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

# torch and nltk take seconds to import: they are imported inside the functions
# that use them, so that create_input_files.py and its image-decoding worker processes, which only
# need the errors and atomic files above, start in a fraction of a second.


class ToolkitError(Exception):
    """An error caused by the user's input; command lines print it without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: temporary files are removed on the way out."""


def raise_terminated(signum, frame):
    raise Terminated()


def run_cli(main, argv=None):
    """Run `main(argv)`, turning ToolkitError, OSError, Ctrl-C and SIGTERM into a one-line message and an
    exit code (2 for errors, 130 for Ctrl-C, 143 for SIGTERM)."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main(argv)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a file the toolkit did not expect to fail: name it
        where = f" {error.filename!r}" if error.filename else ""
        print(f"error: cannot access{where}: {error.strerror or error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        stopped = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"{stopped}: nothing half-written was left behind", file=sys.stderr)
        sys.exit(143 if isinstance(interrupt, Terminated) else 130)


TEMP_SUFFIX = ".tmp"
TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")  # .<name>.<pid>.<random>.tmp
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def temp_prefix(path):
    """The start of the temporary names of `path`: `.<name>.<pid>.`, so a later run can tell whose they are."""
    return f".{os.path.basename(path)}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path, needed_bytes=None):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    Readers never see a half-written file, even after a crash, Ctrl-C or SIGTERM; after a kill -9 the
    temporary file stays, named with the writer's pid, and `remove_stale_temp_files` clears it later.
    A full disk becomes a ToolkitError that says where, how much is free and (given `needed_bytes`) how
    much is needed; the previous file at `path` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it a normal file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if no_space_left(error):
            raise ToolkitError(disk_full_message(path, needed_bytes)) from None
        raise


def no_space_left(error):
    """True for a write that failed because the disk (or a quota, or a file size limit) is full; h5py reports
    that as a plain OSError whose text names the errno."""
    text = str(error)
    if not isinstance(error, OSError):
        return False
    return error.errno in NO_SPACE_ERRNOS or "No space left" in text or "File too large" in text \
        or "errno = 28" in text or "errno = 27" in text


def disk_full_message(path, needed_bytes=None):
    folder = os.path.dirname(os.path.abspath(path))
    need = f"; it needs about {format_bytes(needed_bytes)}" if needed_bytes else ""
    return (f"the disk is full: writing {path!r} failed with {format_bytes(shutil.disk_usage(folder).free)} "
            f"free in {folder!r}{need}. The previous version of the file, if any, is intact; free some space "
            f"or write elsewhere")


def format_bytes(count):
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000


def check_free_space(folder, needed_bytes, what, margin_bytes=0, fix="free some space or write elsewhere"):
    """Refuse before any work when `what` ({needed_bytes} bytes, plus a margin left free) does not fit."""
    free = shutil.disk_usage(folder).free
    if needed_bytes + margin_bytes > free:
        margin = f" plus {format_bytes(margin_bytes)} kept free" if margin_bytes else ""
        raise ToolkitError(f"{what} needs {format_bytes(needed_bytes)}{margin} but {folder!r} has only "
                           f"{format_bytes(free)} free; {fix}")


def check_writable_folder(folder, what):
    """Create `folder` if needed and prove it writable before any work is spent; a ToolkitError naming it and
    `what` (e.g. "cfg['output_folder'] (--output-folder)") otherwise."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ToolkitError(f"{what} {folder!r} is a file, not a folder; pass a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ToolkitError(f"{what} {folder!r} is not writable ({error.strerror or error}); pass a folder "
                           f"you can write to") from None


def check_writable_file(path, what):
    """A file about to be written: its folder must be writable and the path must not be a folder."""
    if os.path.isdir(path):
        raise ToolkitError(f"{what} {path!r} is a folder; pass a file name")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), f"the folder of {what}")


def remove_stale_temp_files(folder):
    """Delete the temporary files that killed runs left in `folder` (their writer's pid is gone); return them."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = TEMP_NAME.match(name)
        if match and not process_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {folder!r} by a killed run "
              f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
    return removed


def process_alive(pid):
    """Whether a process with this pid runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def current_umask():
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- caption metrics
# Caption metrics: the course's BLEU (nltk) and the coco-caption metrics papers report (pycocoevalcap).
#
# Every metric has one key, used in result dicts, checkpoints and
# tables, and one printed label (METRIC_LABELS). A merged dict is `{**course_bleu(...), **coco["scores"]}`.
#
#     key                      label                  what it is
#     bleu1 .. bleu4           BLEU-1 .. BLEU-4       the course's BLEU: nltk corpus_bleu, cumulative weights,
#                                                     no smoothing, on the toolkit's own tokens
#     coco_bleu1 .. coco_bleu4 COCO-BLEU-1 .. 4       coco-caption's BLEU (pycocoevalcap Bleu, closest length)
#     meteor                   METEOR                 METEOR 1.5 (Java)
#     rouge_l                  ROUGE-L                ROUGE-L, beta 1.2
#     cider                    CIDEr                  coco-caption's CIDEr-D (idf over the scored images)
#     spice                    SPICE                  never run: always listed as unavailable
#     ptb_tokenizer            PTB tokenizer          not a score: listed as unavailable when it cannot run
#     peak_in_box, mass_in_box, uniform_mass_in_box, beta_object_words, beta_function_words
#                                                     grounding (grounding.py), on data with object boxes

COURSE_BLEU_WEIGHTS = {"bleu1": (1.0,), "bleu2": (1 / 2,) * 2, "bleu3": (1 / 3,) * 3, "bleu4": (1 / 4,) * 4}
COCO_BLEU_KEYS = ("coco_bleu1", "coco_bleu2", "coco_bleu3", "coco_bleu4")
METRIC_LABELS = {
    "bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
    "coco_bleu1": "COCO-BLEU-1", "coco_bleu2": "COCO-BLEU-2", "coco_bleu3": "COCO-BLEU-3",
    "coco_bleu4": "COCO-BLEU-4",
    "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE",
    "ptb_tokenizer": "PTB tokenizer",
    "peak_in_box": "attention peak in box", "mass_in_box": "attention mass in box",
    "uniform_mass_in_box": "uniform mass in box", "beta_object_words": "beta (object words)",
    "beta_function_words": "beta (function words)",
}
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


def coco_caption_metrics(predictions, references):
    """coco-caption's BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of {image_id: caption} against
    {image_id: [every reference caption]}, both already tokenised (tokens joined by spaces).

    Returns {"scores": {key: value}, "unavailable": {key: reason}}. SPICE is always unavailable; without Java,
    METEOR and the PTB tokenizer are, and captions are lowercased and split on spaces instead (PTB's
    punctuation tokens dropped), which gives PTB's tokens for lowercase, space-separated input.
    """
    _check_coco_inputs(predictions, references)
    gts, res, tokenizer_problem = _tokenize_for_coco(predictions, references)
    unavailable = {}
    if tokenizer_problem:
        unavailable["ptb_tokenizer"] = (f"{tokenizer_problem}; "
                                        f"captions were lowercased and split on spaces instead")
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {key: float(score) for key, score in zip(COCO_BLEU_KEYS, coco_bleu)}
    try:
        scores["meteor"] = _meteor_score(gts, res)
    except _JavaFailure as failure:
        unavailable["meteor"] = str(failure)
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    unavailable["spice"] = SPICE_REASON
    return {"scores": scores, "unavailable": unavailable}


def format_metrics(scores, unavailable=None):
    """Printable lines such as `CIDEr: 0.1234` for each score, in the dict's order, then
    `SPICE: unavailable (reason)` for each entry of `unavailable` (keys as in the module docstring)."""
    lines = [f"{METRIC_LABELS[key]}: {value:.4f}" for key, value in scores.items()]
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


def _tokenize_for_coco(predictions, references):
    """(gts, res, problem): references and predictions tokenised as coco-caption does, by the Stanford PTB
    tokenizer, or by lowercase whitespace splitting when it cannot run (problem then says why, else None)."""
    hypotheses = {image: [caption] for image, caption in predictions.items()}
    try:
        return _ptb_tokenize(references), _ptb_tokenize(hypotheses), None
    except _JavaFailure as failure:
        return _whitespace_tokenize(references), _whitespace_tokenize(hypotheses), str(failure)


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


def _whitespace_tokenize(captions_by_image):
    """{image: [caption]} -> {image: [caption lowercased, split on whitespace, PTB's punctuation dropped]}."""
    return {image: [" ".join(word for word in caption.lower().split() if word not in PUNCTUATIONS)
                    for caption in captions]
            for image, captions in captions_by_image.items()}


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


# ---------------------------------------------------------------- special tokens, arrays and tables

SPECIAL_WORDS = {"<start>", "<end>", "<pad>"}  # tokens of the word map that are not words of a caption


def to_numpy(values):
    """A CPU float array from a numpy array, list or (possibly CUDA, grad-tracking) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


MISSING = "—"


def _cell(value):
    """One markdown cell: floats to 4 decimals, missing as an em dash, pipes escaped."""
    if value is None:
        return MISSING
    is_float = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
    text = f"{value:.4f}" if is_float else str(value)
    return text.replace("|", r"\|").replace("\n", " ")


def markdown_table(rows, columns):
    """A markdown table of `rows` (dicts) with `columns` = [(key, header), ...]."""
    lines = ["| " + " | ".join(_cell(header) for _, header in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


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
