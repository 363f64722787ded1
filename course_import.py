"""Import a checkpoint of the course's train.py as a checkpoint of this toolkit.

The course's train.py saves `torch.save({'epoch', 'epochs_since_improvement', 'bleu-4', 'encoder',
'decoder', 'encoder_optimizer', 'decoder_optimizer'}, filename)` with the WHOLE encoder, decoder and
optimisers pickled. Such a file is read here in one of two ways:

- trusted (`trust_pickle=True`): unpickled by a restricted unpickler (see CourseUnpickler);
- without pickle: the two state_dicts exported in the course's own environment with EXPORT_LINES,
  read with torch.load(weights_only=True).

Every parameter and buffer is then mapped by name and shape onto this toolkit's Encoder ("resnet101")
and DecoderWithAttention or DecoderWithRNN, loaded with strict=True, and written with
checkpoints.save_checkpoint in the format training.Trainer.save writes, so that test, caption, compare and a
resume (cfg['checkpoint']) accept it. The optimiser states are not imported.
"""
import functools
import os
import pickle
import types
from collections.abc import Mapping
from dataclasses import dataclass

import h5py
import torch
from torch import nn

from data_files import data_paths
from datasets import load_word_map
from checkpoints import CHECKPOINT_FORMAT, empty_history, non_torch_file_kind, save_checkpoint
from config import default_cfg, validate_cfg
from models import build_decoder, build_encoder, uninitialised
from utils import ToolkitError, error_summary

COURSE_BACKBONE = "resnet101"
COURSE_ENCODER_DIM = 2048  # channels of the ResNet-101 trunk
COURSE_ENCODED_IMAGE_SIZE = 14  # the course's default, used when a state_dicts export does not say
COURSE_DROPOUT = 0.5
EXPORT_FILE = "course_state_dicts.pth"
EXPORT_LINES = (
    "import torch  # run where the course's models.py is importable",
    "ckpt = torch.load('CHECKPOINT', map_location='cpu', weights_only=False)  # PyTorch < 1.13: drop weights_only",
    "torch.save({'encoder': ckpt['encoder'].state_dict(), 'decoder': ckpt['decoder'].state_dict(), "
    "'encoded_image_size': ckpt['encoder'].enc_image_size, 'epoch': ckpt['epoch'], "
    "'epochs_since_improvement': ckpt['epochs_since_improvement'], 'bleu-4': float(ckpt['bleu-4'])}, "
    f"'{EXPORT_FILE}')",
)
# The course's parameter names -> this toolkit's, by prefix (the first matching prefix wins).
ENCODER_RENAMES = (("resnet.", "trunk."),)
DECODER_RENAMES = (("attention.full_att.", "attention.att."),  # sgrvinod's name of the score layer
                   ("beta.", "f_beta."))  # where the course's `beta` is the gate's Linear, not the Sigmoid
OPTIMIZER_NOTE = ("note: the course's optimiser states are not imported; resuming this checkpoint "
                  "(cfg['checkpoint'], --checkpoint) starts fresh Adam optimisers at the cfg's learning rates")


# ---------------------------------------------------------------- reading the course's file

@dataclass
class CourseCheckpoint:
    """What a course checkpoint holds, as plain data."""
    encoder_state: Mapping
    decoder_state: Mapping
    epoch: int
    epochs_since_improvement: int
    bleu4: float
    encoded_image_size: int | None  # None: not recorded (a state_dicts export without it)
    dropout: float | None
    fine_tuned_encoder: bool


class CourseModule(nn.Module):
    """Stand-in for a class of the course's models.py: the unpickled parameters, buffers and submodules
    land in it (nn.Module.__setstate__), so state_dict() works, and none of the course's code runs."""

    course_class = None  # "models.Encoder", ...


class DiscardedObject:
    """Stand-in for a pickled optimiser: its state is dropped unread."""

    def __setstate__(self, state):
        pass


@functools.cache
def course_stand_in(module, name):
    return type(name, (CourseModule,), {"course_class": f"{module}.{name}"})


COURSE_MODULES = ("models", "__main__")  # the course's models.py, or classes defined in a notebook
PY2_NAMES = {"__builtin__": "builtins"}  # pickle protocol 2 writes Python 2 module names
DATA_GLOBALS = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "dict"), ("builtins", "list"),
    ("torch", "device"), ("torch", "Size"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
}
MODULE_PACKAGES = ("torch.nn.modules.", "torchvision.models.")  # nn.Module classes the course's modules hold


class CourseUnpickler(pickle.Unpickler):
    """Unpickles a course checkpoint without running the course's code, or anything but torch's own.

    The file names the course's classes `models.Encoder`, `models.DecoderWithAttention`, ...; a plain
    unpickler would import `models` and find THIS toolkit's models.py, whose classes of the same names
    have other attributes and code: the objects would be broken, and their methods this toolkit's. Here
    the course's classes become CourseModule stand-ins, optimisers DiscardedObject, torch's and
    torchvision's module classes and tensor rebuilders themselves; any other global (which pickle would
    call) is refused.
    """

    def find_class(self, module, name):
        module = PY2_NAMES.get(module, module)
        if module in COURSE_MODULES:
            return course_stand_in(module, name)
        if module.startswith("torch.optim."):
            return DiscardedObject
        if (module, name) in DATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(MODULE_PACKAGES):
            found = super().find_class(module, name)
            if isinstance(found, type) and issubclass(found, nn.Module):
                return found
        raise pickle.UnpicklingError(f"the file refers to {module}.{name}, which a course checkpoint does not hold")


def _course_pickle_module():
    """A module-like object for torch.load(pickle_module=...): torch subclasses its Unpickler."""
    module = types.ModuleType("course_pickle")
    module.Unpickler = CourseUnpickler
    module.load = lambda file, **options: CourseUnpickler(file, **options).load()
    return module


def export_instructions(path):
    lines = "\n    ".join(line.replace("CHECKPOINT", os.path.basename(path)) for line in EXPORT_LINES)
    return (f"export its two state_dicts in the course's own environment:\n    {lines}\n"
            f"and import {EXPORT_FILE} instead, which is read without pickle")


def pickle_refusal(path):
    return (f"{path!r} holds pickled Python objects (the course's train.py saves whole modules and "
            f"optimisers), and unpickling can run any code the file names. If you trust the file, pass "
            f"trust_pickle=True (--trust-pickle); otherwise {export_instructions(path)}")


def read_course_file(path, trust_pickle=False):
    """The CourseCheckpoint in a course train.py checkpoint (pickled: only with trust_pickle) or in a
    state_dicts export (read without pickle)."""
    if not os.path.isfile(path):
        raise ToolkitError(f"course checkpoint {path!r} does not exist; pass the path of a checkpoint written "
                           f"by the course's train.py, or of its state_dicts export ({EXPORT_FILE})")
    foreign = non_torch_file_kind(path)
    if foreign:
        raise ToolkitError(f"{path!r} is not a PyTorch file ({foreign}); pass the checkpoint that the course's "
                           f"train.py wrote (BEST_checkpoint_*.pth.tar), or its state_dicts export ({EXPORT_FILE})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise ToolkitError(pickle_refusal(path)) from None
        return from_pickled(load_pickled(path), path)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        raise ToolkitError(f"{path!r} cannot be read as a PyTorch file ({error_summary(error)}); pass the "
                           f"checkpoint that the course's train.py wrote, or its state_dicts export "
                           f"({EXPORT_FILE})") from None
    return from_state_dicts(loaded, path)


def load_pickled(path):
    try:
        return torch.load(path, map_location="cpu", pickle_module=_course_pickle_module(), weights_only=False)
    except Exception as error:  # a refused global, or objects that do not unpickle in this torch
        raise ToolkitError(f"{path!r} cannot be read as a checkpoint of the course's train.py "
                           f"({error_summary(error, 400)}); if it is one, {export_instructions(path)}") from None


def check_course_keys(checkpoint, path, kind):
    if not isinstance(checkpoint, dict) or not {"encoder", "decoder"} <= checkpoint.keys():
        held = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ToolkitError(f"{path!r} is not {kind}: it lacks the 'encoder' and 'decoder' entries (it holds {held})")


def from_pickled(checkpoint, path):
    """CourseCheckpoint of the unpickled dict of the course's train.py."""
    check_course_keys(checkpoint, path, "a checkpoint of the course's train.py")
    encoder, decoder = checkpoint["encoder"], checkpoint["decoder"]
    for key, module in (("encoder", encoder), ("decoder", decoder)):
        if not isinstance(module, nn.Module):
            raise ToolkitError(f"{path!r}: its {key!r} entry is a {type(module).__name__}, not a pickled module")
    dropout = decoder._modules.get("dropout")
    return CourseCheckpoint(
        plain_state_dict(encoder, path, "encoder"), plain_state_dict(decoder, path, "decoder"),
        int(checkpoint.get("epoch", -1)),
        int(checkpoint.get("epochs_since_improvement", 0)), float(checkpoint.get("bleu-4", 0.0)),
        encoded_image_size_of(encoder), dropout.p if isinstance(dropout, nn.Dropout) else None,
        checkpoint.get("encoder_optimizer") is not None)


def plain_state_dict(module, path, key):
    """What state_dict() returns, read from the parameters and persistent buffers of `module` and its submodules
    alone: state_dict() would call the hooks an unpickled file may set (in _state_dict_hooks and the like), and
    the file's classes' own methods; here nothing of the file is called."""
    state, inside = {}, set()

    def refuse(what):
        raise ToolkitError(f"{path!r}: its {key!r} module {what}; it is not a checkpoint of the course's train.py")

    def entries(current, attribute, prefix):
        held = vars(current).get(attribute, {})
        if not isinstance(held, Mapping):
            refuse(f"holds a {type(held).__name__} as {attribute} of {prefix.rstrip('.') or 'the top module'}")
        return list(held.items())

    def visit(current, prefix):
        if not isinstance(current, nn.Module):
            refuse(f"holds a {type(current).__name__} at {prefix.rstrip('.') or 'the top'}, where a module should be")
        if id(current) in inside:
            refuse(f"contains itself at {prefix.rstrip('.')}")
        inside.add(id(current))
        non_persistent = vars(current).get("_non_persistent_buffers_set", set())
        if not isinstance(non_persistent, (set, frozenset)):
            refuse(f"holds a {type(non_persistent).__name__} as the non-persistent buffers of "
                   f"{prefix.rstrip('.') or 'the top module'}")
        named = entries(current, "_parameters", prefix)
        named += [(name, value) for name, value in entries(current, "_buffers", prefix) if name not in non_persistent]
        for name, value in named:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                refuse(f"holds a {type(value).__name__} as the tensor {prefix + name!r}")
            state[prefix + name] = value.detach()
        for name, child in entries(current, "_modules", prefix):
            if child is not None:
                visit(child, f"{prefix}{name}.")
        inside.discard(id(current))

    visit(module, "")
    return state


def encoded_image_size_of(encoder):
    """G of the course encoder's G x G output: its enc_image_size, else its adaptive pool's output size."""
    size = getattr(encoder, "enc_image_size", None)
    pool = encoder._modules.get("adaptive_pool")
    if size is None and isinstance(pool, nn.AdaptiveAvgPool2d):
        size = pool.output_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return None if size is None else int(size)


def from_state_dicts(loaded, path):
    """CourseCheckpoint of a state_dicts export (EXPORT_LINES)."""
    if isinstance(loaded, dict) and loaded.get("format") == CHECKPOINT_FORMAT:
        raise ToolkitError(f"{path!r} is already a checkpoint of this toolkit: use it as it is")
    check_course_keys(loaded, path, f"a state_dicts export of a course checkpoint ({EXPORT_FILE})")
    for key in ("encoder", "decoder"):
        if not isinstance(loaded[key], Mapping):
            raise ToolkitError(f"{path!r}: its {key!r} entry is a {type(loaded[key]).__name__}, not a state_dict")
    size = loaded.get("encoded_image_size")
    return CourseCheckpoint(loaded["encoder"], loaded["decoder"], int(loaded.get("epoch", -1)),
                            int(loaded.get("epochs_since_improvement", 0)), float(loaded.get("bleu-4", 0.0)),
                            None if size is None else int(size), None, False)


# ---------------------------------------------------------------- mapping the parameters

def renamed(state, renames, path, what):
    """{toolkit name: (course name, tensor)} with the first matching prefix of `renames` replaced."""
    mapped = {}
    for name, tensor in state.items():
        new_name = next((new + name[len(old):] for old, new in renames if name.startswith(old)), name)
        if new_name in mapped:
            raise ToolkitError(f"{path!r}: the course's {what} has both {mapped[new_name][0]!r} and {name!r}, "
                               f"which both map to this toolkit's {new_name!r}")
        mapped[new_name] = (name, tensor)
    return mapped


def shape_text(tensor):
    return str(tuple(tensor.shape))


def map_state(course_state, renames, model, path, what):
    """The course's state renamed for `model`, every name and shape checked: a ToolkitError lists what is
    missing, extra or of another shape."""
    mapped = renamed(course_state, renames, path, what)
    target = model.state_dict()
    problems = [f"{name!r} {shape_text(tensor)} is missing" for name, tensor in target.items() if name not in mapped]
    for name, (course_name, tensor) in mapped.items():
        if name not in target:
            problems.append(f"{course_name!r} {shape_text(tensor)} has no counterpart")
        elif tensor.shape != target[name].shape:
            problems.append(f"{course_name!r} has shape {shape_text(tensor)} where this toolkit's {name!r} "
                            f"has {shape_text(target[name])}")
    if problems:
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise ToolkitError(f"{path!r}: the course's {what} does not fit this toolkit's "
                           f"{type(model).__name__}: {'; '.join(problems[:6])}{more}")
    return {name: tensor.to(target[name].dtype) for name, (_, tensor) in mapped.items()}


def tensor_of(state, name, path, what):
    if name not in state:
        raise ToolkitError(f"{path!r}: the course's {what} has no {name!r}; it holds {', '.join(list(state)[:8])}, ...")
    return state[name]


def decoder_kind(state, path):
    """'attention' for the course's DecoderWithAttention, 'rnn' for its DecoderWithRNN."""
    if any(name.startswith("attention.") for name in state):
        return "attention"
    if "init.weight" in state:
        return "rnn"
    raise ToolkitError(f"{path!r}: its decoder is neither the course's DecoderWithAttention (attention.*) nor its "
                       f"DecoderWithRNN (init.*, bn.*); it holds {', '.join(list(state)[:8])}, ...")


def decoder_dims(state, kind, path):
    """embed_dim, attention_dim, decoder_dim and vocabulary size from the course decoder's shapes."""
    vocab_size = tensor_of(state, "embedding.weight", path, "decoder").shape[0]
    decoder_dim = tensor_of(state, "decode_step.weight_hh", path, "decoder").shape[1]
    if kind == "rnn":  # the course's LSTMCell(decoder_dim, decoder_dim) takes the words at decoder_dim
        embed_dim = tensor_of(state, "decode_step.weight_ih", path, "decoder").shape[1]
        attention_dim = default_cfg()["attention_dim"]
    else:
        embed_dim = state["embedding.weight"].shape[1]
        attention_dim = tensor_of(state, "attention.encoder_att.weight", path, "decoder").shape[0]
    return {"embed_dim": embed_dim, "attention_dim": attention_dim, "decoder_dim": decoder_dim}, vocab_size


def check_rnn_start(state, encoder_dim, grid, path):
    """The toolkit's DecoderWithRNN starts from the mean of the G x G grid (init: encoder_dim inputs); the
    course's from the flattened grid (G * G * encoder_dim inputs). They agree for G = 1 (or a course decoder
    changed to take the mean); otherwise the decoder cannot be represented here."""
    weight = tensor_of(state, "init.weight", path, "decoder")
    if weight.shape[1] != encoder_dim:
        raise ToolkitError(
            f"{path!r}: the course's DecoderWithRNN reads the whole flattened {grid} x {grid} x {encoder_dim} grid "
            f"(init.weight {shape_text(weight)}), while this toolkit's DecoderWithRNN reads the mean of the grid "
            f"(init.weight ({weight.shape[0]}, {encoder_dim})); such a decoder cannot be imported. Decoders trained "
            f"with encoded_image_size 1 (where the two agree) and attention decoders can")


# ---------------------------------------------------------------- the toolkit's checkpoint

def image_size_of(data_folder, data_name):
    """Side of the images in the data folder's first IMAGES file (TEST, VAL, TRAIN); 256 without any."""
    for split in ("TEST", "VAL", "TRAIN"):
        path = data_paths(data_folder, data_name, split)["images"]
        if os.path.isfile(path):
            try:
                with h5py.File(path, "r") as h5:
                    return int(h5["images"].shape[-1])
            except (OSError, KeyError) as error:
                raise ToolkitError(f"{path!r} is not an images file of create_input_files.py ({error})") from None
    print("note: no IMAGES file in the data folder; the image size is taken as the course's 256")
    return 256


def toolkit_cfg(course, kind, dims, data_folder, data_name, encoded_image_size):
    cfg = dict(default_cfg(), data_folder=os.fspath(data_folder), data_name=data_name, decoder=kind,
               encoder=COURSE_BACKBONE, encoded_image_size=encoded_image_size,
               dropout=COURSE_DROPOUT if course.dropout is None else course.dropout,
               fine_tune_encoder=course.fine_tuned_encoder, best_bleu4=course.bleu4,
               epochs_since_improvement=course.epochs_since_improvement, **dims)
    del cfg["attention"]  # validate_cfg derives it from `decoder`
    return dict(validate_cfg(cfg), device=None)


def pick_encoded_image_size(course, override, path):
    if override is not None:
        return override
    if course.encoded_image_size is not None:
        return course.encoded_image_size
    print(f"note: {path!r} does not record the encoder's grid size; taking the course's "
          f"{COURSE_ENCODED_IMAGE_SIZE} (pass encoded_image_size / --encoded-image-size if it was another)")
    return COURSE_ENCODED_IMAGE_SIZE


def default_out(path):
    """`<name>.toolkit.pth.tar` beside the course's file `<name>.pth.tar` (or .pth, .tar)."""
    base = path
    for suffix in (".pth.tar", ".pth", ".tar", ".pt"):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base + ".toolkit.pth.tar"


def import_course_checkpoint(path, data_folder, data_name, out=None, trust_pickle=False, encoded_image_size=None):
    """Convert a checkpoint of the course's train.py (or its state_dicts export) into a checkpoint of this
    toolkit; returns the path written (`out`, by default `<name>.toolkit.pth.tar` beside `path`).

    data_folder, data_name: the course's data (its WORDMAP_<data_name>.json is the checkpoint's word map).
    trust_pickle: allow unpickling the course's file (see CourseUnpickler); without it only a state_dicts
    export is read. encoded_image_size: the encoder's grid side, when the file does not record it.
    """
    path = os.fspath(path)
    out = os.fspath(out) if out is not None else default_out(path)
    if os.path.abspath(out) == os.path.abspath(path):
        raise ToolkitError(f"out {out!r} is the course's checkpoint itself; write the import to another file")
    course = read_course_file(path, trust_pickle)
    word_map = load_word_map(data_folder, data_name)
    kind = decoder_kind(course.decoder_state, path)
    dims, vocab_size = decoder_dims(course.decoder_state, kind, path)
    if vocab_size != len(word_map):
        raise ToolkitError(f"{path!r} was trained with a vocabulary of {vocab_size} words but "
                           f"WORDMAP_{data_name}.json in {data_folder!r} has {len(word_map)}; pass the data folder "
                           f"and data name the course trained on")
    grid = pick_encoded_image_size(course, encoded_image_size, path)
    cfg = toolkit_cfg(course, kind, dims, data_folder, data_name, grid)
    if kind == "rnn":
        check_rnn_start(course.decoder_state, COURSE_ENCODER_DIM, grid, path)
    decoder = build_decoder(cfg, vocab_size, COURSE_ENCODER_DIM)
    decoder.load_state_dict(map_state(course.decoder_state, DECODER_RENAMES, decoder, path, "decoder"), strict=True)
    encoder = uninitialised(lambda: build_encoder(cfg, weights=None))
    encoder.load_state_dict(map_state(course.encoder_state, ENCODER_RENAMES, encoder, path, "encoder"), strict=True)
    checkpoint = {"cfg": cfg, "word_map": word_map, "image_size": image_size_of(data_folder, data_name),
                  "encoder_state": encoder.state_dict(), "decoder_state": decoder.state_dict(),
                  "encoder_optimizer": None, "decoder_optimizer": None, "epoch": course.epoch,
                  "best_bleu4": course.bleu4, "epochs_since_improvement": course.epochs_since_improvement,
                  "history": empty_history()}
    save_checkpoint(checkpoint, out)
    print(f"imported the course's {kind} decoder and {COURSE_BACKBONE} encoder (epoch {course.epoch}, "
          f"BLEU-4 {course.bleu4:.4f}) from {path!r} into {out!r}")
    print(OPTIMIZER_NOTE)
    return out
