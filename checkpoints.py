"""Checkpoint files: safe saving and loading, the names of a run's files, and the lock that keeps two runs of
one name apart.

A checkpoint is a dict of state_dicts and plain data (cfg, word map, counters, history), written
atomically and read with `torch.load(..., weights_only=True)`, so loading one can never run code.
"""
import dataclasses
import io
import os
import sys

import torch

from utils import ToolkitError, atomic_path, process_alive

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
    """Load a checkpoint of this toolkit safely (weights_only: it can never run code)."""
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
    if version > FORMAT_VERSION:
        raise ToolkitError(f"{path!r} was written by a newer version of this toolkit (checkpoint format "
                           f"{version}, this version reads up to {FORMAT_VERSION}); update the toolkit")
    return checkpoint


def unloadable_message(path, error):
    """Why a file cannot be loaded safely, in words: a checkpoint of the course's code, or a broken file."""
    course_classes = pickled_model_classes(path)
    if course_classes:
        return (f"{path!r} looks like a checkpoint written by the course's train.py: it pickles whole models "
                f"({', '.join(course_classes[:4])}), and loading it would run code from the file. Convert it "
                f"once with `python solver.py import-course {path} --data-folder DIR --data-name NAME` (see "
                f"docs/course-checkpoints.md)")
    first_line = str(error).splitlines()[0] if str(error) else ""
    return (f"{path!r} is not a checkpoint of this toolkit or is damaged; it cannot be loaded safely "
            f"({type(error).__name__}: {first_line[:200]})")


def pickled_model_classes(path):
    """The classes of the course's models module that a pickled checkpoint would import, read without
    unpickling; [] for anything else."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file at all
        return []
    return [name for name in names if name.startswith("models.")]


def check_resume_keys(checkpoint, path):
    """Refuse a checkpoint that lacks what a resume needs, naming the key and what the file seems to be."""
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        seems = ("a checkpoint for test and caption only (no optimiser state)"
                 if "encoder_state" in checkpoint and "decoder_state" in checkpoint else "not a training checkpoint")
        raise ToolkitError(f"checkpoint {path!r} lacks {', '.join(map(repr, missing))}, which resuming needs; it "
                           f"seems to be {seems}. Resume from the checkpoint_<run>.pth.tar that training wrote, "
                           f"or start a new run")


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
