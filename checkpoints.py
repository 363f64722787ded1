"""Checkpoint files: safe saving and loading, the names of a run's files, and the lock that keeps two runs of
one name apart.

A checkpoint is a dict of state_dicts and plain data (cfg, word map, counters, history), written
atomically and read with `torch.load(..., weights_only=True)`, so loading one can never run code.
"""
import dataclasses
import io
import os
import re
import sys
import zipfile

import torch

from utils import ToolkitError, atomic_path, error_summary, process_alive
from vocabulary import WORD_MAP_TOKENS

CHECKPOINT_FORMAT = "captioning-toolkit/1"  # the tag every checkpoint of this toolkit carries
FORMAT_VERSION = 2  # 1: before the format_version key; 2: adds val_metric, best_score and the lr bases
# What a resume reads besides the weights; a checkpoint without one of them cannot continue a run.
RESUME_KEYS = ("cfg", "word_map", "encoder_state", "decoder_state", "decoder_optimizer", "epoch",
               "epochs_since_improvement", "history")


def empty_history():
    """The history of a run before its first epoch; each epoch appends to every metric it computed."""
    return {"epoch": []}


def save_checkpoint(state, path):
    """Write a checkpoint dict (state_dicts and plain data only) atomically.

    It is serialised in memory first and written with one plain write, so that a full disk is an OSError
    (which atomic_path reports) rather than an error from deep inside torch.save's zip writer."""
    buffer = io.BytesIO()
    torch.save(dict(state, format=CHECKPOINT_FORMAT, format_version=FORMAT_VERSION), buffer)
    with atomic_path(path, needed_bytes=buffer.getbuffer().nbytes) as tmp, open(tmp, "wb") as file:
        file.write(buffer.getbuffer())


def iter_tensors(value):
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_tensors(item)


def checkpoint_bytes(state):
    """About how many bytes torch.save writes for `state` (its tensors; plain data is small)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(state))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint of this toolkit safely (weights_only: it can never run code); its format tag and
    version are checked, its content by check_checkpoint."""
    if not os.path.isfile(path):
        raise ToolkitError(f"checkpoint {path!r} does not exist; pass the path of a "
                           f"checkpoint_*.pth.tar or BEST_checkpoint_*.pth.tar file written by training")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        raise ToolkitError(unloadable_message(path, error)) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ToolkitError(f"{path!r} is not a checkpoint of this toolkit (no '{CHECKPOINT_FORMAT}' format tag); "
                           f"pass a checkpoint written by solver.train")
    version = checkpoint.get("format_version", 1)
    if not is_whole_number(version) or version < 1:
        raise ToolkitError(damaged(path, f"format_version = {version!r} ({type(version).__name__})",
                                   f"a whole number from 1 to {FORMAT_VERSION}"))
    if version > FORMAT_VERSION:
        raise ToolkitError(f"{path!r} was written by a newer version of this toolkit (checkpoint format "
                           f"{version}, this version reads up to {FORMAT_VERSION}); update the toolkit")
    return checkpoint


def unloadable_message(path, error):
    """Why a file cannot be loaded safely, in words: a checkpoint of the course's code, another kind of file,
    or a broken one."""
    course_classes = pickled_model_classes(path)
    if course_classes:
        return (f"{path!r} looks like a checkpoint written by the course's train.py (or by its code in a notebook): "
                f"it pickles whole models ({', '.join(course_classes[:4])}), and loading it would run code from "
                f"the file. Convert it once with `python solver.py import-course {path} --data-folder DIR "
                f"--data-name NAME` (see docs/course-checkpoints.md)")
    foreign = non_torch_file_kind(path)
    if foreign:
        return (f"{path!r} is not a PyTorch file ({foreign}); pass a checkpoint_*.pth.tar or "
                f"BEST_checkpoint_*.pth.tar file written by training")
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # weights-only loading met a class or function
    why = (f"it refers to {refused[1]}, which a checkpoint of this toolkit does not hold" if refused
           else error_summary(error))
    return (f"{path!r} is not a checkpoint of this toolkit or is damaged; it cannot be loaded safely ({why}). "
            f"Pass a checkpoint_*.pth.tar or BEST_checkpoint_*.pth.tar file written by training")


COURSE_MODULES = ("models.", "__main__.")  # the course's models.py, or its classes defined in a notebook


def pickled_model_classes(path):
    """The classes of the course's models module (or of a notebook's __main__) that a pickled checkpoint would
    import, read without unpickling; [] for anything else."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file at all
        return []
    return [name for name in names if name.startswith(COURSE_MODULES)]


FILE_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
                   (b"RIFF", "a RIFF file (WebP image, WAV sound...)"), (b"BM", "a BMP image"),
                   (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"%PDF", "a PDF document"),
                   (b"\x89HDF", "an HDF5 file"), (b"\x1f\x8b", "a gzip file"), (b"{", "JSON or other text"),
                   (b"[", "JSON or other text"))


def non_torch_file_kind(path):
    """None for a file torch.save may have written (its zip format, or a pickle: the legacy format starts with
    one); else what the file seems to be, in words."""
    if zipfile.is_zipfile(path):
        return None
    try:
        with open(path, "rb") as file:
            head = file.read(8)
    except OSError:
        return None
    if head[:1] == b"\x80":  # a pickle of protocol 2 or later
        return None
    if not head:
        return "it is empty"
    kind = next((kind for signature, kind in FILE_SIGNATURES if head.startswith(signature)), None)
    return f"it looks like {kind}" if kind else "neither torch.save's zip format nor a pickle"


def is_whole_number(value):
    return isinstance(value, int) and not isinstance(value, bool)


def damaged(path, holds, should):
    """The message for an entry of a loaded checkpoint that training would never have written."""
    return (f"checkpoint {path!r} holds {holds}, where it should hold {should}: the file was edited or damaged "
            f"after training wrote it. Use the checkpoint that training (or import-course) wrote, or put the "
            f"entry back as it was")


def is_state_dict(value):
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def is_word_map(value):
    return (isinstance(value, dict) and all(isinstance(k, str) and is_whole_number(v) and v >= 0
                                            for k, v in value.items())
            and all(token in value for token in WORD_MAP_TOKENS))


# key -> (test, what it should hold) of the entries a command may need
ENTRY_CHECKS = {
    "cfg": (lambda v: isinstance(v, dict), "a dict of cfg key -> value"),
    "word_map": (is_word_map, f"a dict of word -> index holding {', '.join(WORD_MAP_TOKENS)}"),
    "image_size": (lambda v: is_whole_number(v) and v >= 1, "the side of the images in pixels (a whole number)"),
    "encoder_state": (is_state_dict, "the encoder's state_dict (a dict of name -> tensor)"),
    "decoder_state": (is_state_dict, "the decoder's state_dict (a dict of name -> tensor)"),
    "decoder_optimizer": (lambda v: v is None or isinstance(v, dict),
                          "the decoder optimiser's state_dict (a dict), or None (an imported model)"),
    "epoch": (lambda v: is_whole_number(v) and v >= -1, "the last epoch trained (a whole number)"),
    "epochs_since_improvement": (lambda v: is_whole_number(v) and v >= 0, "a whole number of epochs"),
    "history": (lambda v: isinstance(v, dict), "a dict of metric -> list of values per epoch"),
}
INFERENCE_KEYS = ("cfg", "word_map", "image_size", "encoder_state", "decoder_state")  # what test and caption read


def describe(value):
    text = repr(value)
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"


def check_checkpoint(checkpoint, path, needs=INFERENCE_KEYS):
    """The one check of a loaded checkpoint's content, before anything is built from it: every entry in `needs`
    is there and holds what training writes, and its cfg (completed with the keys added since, see
    config.upgrade_cfg) has the types and values of config.CFG_SCHEMA. A ToolkitError names the file, the entry
    or cfg key, what it holds and what it should hold. Returns the checkpoint with its cfg completed."""
    from config import model_cfg_problem, upgrade_cfg  # config imports the models; this module is imported early

    missing = [key for key in needs if key not in checkpoint]
    if missing:
        raise ToolkitError(f"checkpoint {path!r} lacks {', '.join(map(repr, missing))}: the file was edited or "
                           f"damaged after training wrote it, or was written by other code. Use the checkpoint "
                           f"that training (or import-course) wrote")
    for key in needs:
        test, should = ENTRY_CHECKS.get(key, (lambda v: True, ""))
        if not test(checkpoint[key]):
            raise ToolkitError(damaged(path, f"{key} = {describe(checkpoint[key])}", should))
    if "cfg" not in needs:
        return checkpoint
    cfg = upgrade_cfg(checkpoint["cfg"], path)
    problem = model_cfg_problem(cfg)
    if problem:
        raise ToolkitError(damaged(path, *problem))
    return dict(checkpoint, cfg=cfg)


def check_resume_keys(checkpoint, path):
    """Refuse a checkpoint that lacks what a resume needs, naming the key and what the file seems to be, or
    whose entries are not what training writes (check_checkpoint)."""
    if any(key not in checkpoint for key in INFERENCE_KEYS if key in RESUME_KEYS):
        check_checkpoint(checkpoint, path, needs=RESUME_KEYS)  # no model in it: edited, damaged or foreign
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        seems = ("a checkpoint for test and caption only (no optimiser state)"
                 if "encoder_state" in checkpoint and "decoder_state" in checkpoint else "not a training checkpoint")
        raise ToolkitError(f"checkpoint {path!r} lacks {', '.join(map(repr, missing))}, which resuming needs; it "
                           f"seems to be {seems}. Resume from the checkpoint_<run>.pth.tar that training wrote, "
                           f"or start a new run")
    check_checkpoint(checkpoint, path, needs=RESUME_KEYS)


# ---------------------------------------------------------------- the files of a run

@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of one training run in its output folder."""
    name: str
    folder: str

    @property
    def last(self):
        return os.path.join(self.folder, f"checkpoint_{self.name}.pth.tar")

    @property
    def best(self):
        return os.path.join(self.folder, f"BEST_checkpoint_{self.name}.pth.tar")

    @property
    def lock(self):
        return os.path.join(self.folder, f".{self.name}.lock")


def run_name(cfg):
    """cfg['run_name'], or <data_name>_<decoder>_<encoder>[_finetune]."""
    if cfg["run_name"]:
        return cfg["run_name"]
    parts = [cfg["data_name"], cfg["decoder"], cfg["encoder"]] + (["finetune"] if cfg["fine_tune_encoder"] else [])
    return "_".join(parts)


class RunLock:
    """A lock file holding the pid of the process that trains a run; a second process is refused while the
    first lives, and a lock left by a killed process is taken over."""

    def __init__(self, path):
        self.path = path
        self.held = False

    def acquire(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is not None and owner != os.getpid() and process_alive(owner):
                    raise ToolkitError(f"another process (pid {owner}) is training the run of lock file "
                                       f"{self.path!r}; wait for it to end, or give this run another "
                                       f"cfg['run_name'] (--run-name). If no run of this name is going on (pid "
                                       f"{owner} is another program, which got the pid of a killed run), the lock "
                                       f"is stale and removing {self.path!r} is safe") from None
                if owner != os.getpid():
                    print(f"note: taking over the lock {self.path!r} left by a process that is gone (pid {owner})")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as file:
                file.write(str(os.getpid()))
            self.held = True
            return self
        raise ToolkitError(f"cannot take the lock {self.path!r}: another process keeps creating it")

    def owner(self):
        """The pid written in the lock file; None when it is unreadable (a process killed while writing it)."""
        try:
            with open(self.path, encoding="utf-8") as file:
                return int(file.read().strip())
        except (OSError, ValueError):
            return None

    def release(self):
        """Remove the lock file. A failure (its folder made read-only, ...) is a note, never an error: release runs
        while another error may be ending the run, and must not hide it."""
        if self.held:
            self.held = False
            try:
                if self.owner() == os.getpid():
                    os.remove(self.path)
            except OSError as error:
                print(f"note: cannot remove the lock file {self.path!r} ({error.strerror or error}); the next run "
                      f"takes it over (its process is gone), or remove it yourself", file=sys.stderr)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
