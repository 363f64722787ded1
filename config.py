"""The training cfg: its keys, defaults and checks, and the command-line options generated from them.

`train(cfg)` takes the course's cfg dict (its keys keep their meaning) plus the toolkit's own; every key,
its default, its types and its meaning live in CFG_SCHEMA, from which docs/cfg.md's table and the
`solver.py train` options are made, so the three cannot drift apart.
"""
import argparse
import json
import math
import os

import torch

from backbones import BACKBONES
from clip_score import DEFAULT_CLIP_MODEL, weights_path
from models import DECODERS
from utils import ToolkitError

NONE = type(None)
DEFAULT_WARMUP_STEPS = 20000  # self-critical.pytorch's Noam warm-up for its Transformer

# key -> (default, allowed types, meaning). The course's keys (its section 2.2) first, then the toolkit's.
CFG_SCHEMA = {
    # Data
    "data_folder": (None, (str,), "folder holding the files of create_input_files.py (required)"),
    "data_name": (None, (str,), "base name of the data files, e.g. coco_5_cap_per_img_5_min_word_freq (required)"),
    # Model
    "decoder": (None, (str, NONE), "rnn, attention, adaptive or transformer; None follows `attention`"),
    "attention": (False, (bool,), "the course's switch: True trains the attention decoder"),
    "encoder": ("resnet101", (str,), "backbone of the encoder (see backbones.BACKBONES)"),
    "encoder_weights": ("IMAGENET1K_V1", (str, NONE), "torchvision weights name or open_clip tag (CLIP), a state_dict file, or None"),
    "encoded_image_size": (14, (int,), "side of the encoder's output grid"),
    "embed_dim": (512, (int,), "dimension of word embeddings"),
    "attention_dim": (512, (int,), "dimension of attention linear layers"),
    "decoder_dim": (512, (int,), "dimension of decoder RNN (the transformer's model width)"),
    "dropout": (0.5, (float, int), "dropout before the output layer (the LSTM decoders)"),
    "transformer_layers": (6, (int,), "the transformer's decoder layers"),
    "transformer_encoder_layers": (6, (int,), "the transformer's self-attention layers over the grid (0: none)"),
    "transformer_heads": (8, (int,), "attention heads of the transformer (divides decoder_dim)"),
    "transformer_ff_dim": (2048, (int,), "feed-forward width of the transformer's layers"),
    "transformer_dropout": (0.1, (float, int), "dropout of the transformer"),
    "device": (None, (str, torch.device, NONE), "cpu, cuda, cuda:1...; None picks cuda when available"),
    # Training
    "start_epoch": (0, (int,), "first epoch of a fresh run (a resumed run continues after its checkpoint)"),
    "epochs": (10, (int,), "number of epochs to train for (if early stopping is not triggered)"),
    "epochs_since_improvement": (0, (int,), "epochs since the last improvement of the val metric at the start"),
    "batch_size": (32, (int,), "captions per batch (grouped: batch_size // captions_per_image images)"),
    "workers": (None, (int, NONE), "DataLoader worker processes; None: min(4, CPU cores)"),
    "encoder_lr": (1e-4, (float, int), "learning rate for the encoder if fine-tuning"),
    "decoder_lr": (4e-4, (float, int), "learning rate for the decoder"),
    "grad_clip": (5.0, (float, int, NONE), "clip gradients at this absolute value; None: no clipping"),
    "alpha_c": (1.0, (float, int), "weight of the doubly stochastic attention regularisation"),
    "label_smoothing": (0.0, (float, int), "label smoothing of the XE stage's cross-entropy, in [0, 1) (0: none; "
                                           "validation's loss stays the plain cross-entropy)"),
    # Scheduled sampling of the XE stage (Bengio et al. 2015), with self-critical.pytorch's keys and formula
    "scheduled_sampling_start": (-1, (int,), "epoch from which the XE stage feeds, with probability p, the model's own "
                                             "sampled word instead of the reference's (-1: off); at epoch e >= start, "
                                             "p = min(increase_prob x ((e - start) // increase_every), max_prob)"),
    "scheduled_sampling_increase_every": (5, (int,), "scheduled sampling: p rises every this many epochs"),
    "scheduled_sampling_increase_prob": (0.05, (float, int), "scheduled sampling: p rises by this much, in [0, 1]"),
    "scheduled_sampling_max_prob": (0.25, (float, int), "scheduled sampling: p stops at this value, in [0, 1]"),
    "best_bleu4": (0.0, (float, int), "best val BLEU-4 so far at the start"),
    "print_freq": (100, (int,), "print training stats every this many batches (0: never)"),
    "fine_tune_encoder": (False, (bool,), "fine-tune blocks 2-4 of the encoder"),
    "checkpoint": (None, (str, NONE), "checkpoint to resume from; None starts fresh"),
    "lr_decay_factor": (0.8, (float, int), "learning rates are multiplied by this ..."),
    "lr_decay_patience": (8, (int,), "... after every this many epochs without improvement"),
    "early_stop_patience": (20, (int,), "stop after this many epochs without improvement"),
    "output_folder": ("checkpoints", (str,), "where checkpoints are written"),
    "run_name": (None, (str, NONE), "names the checkpoints; None: <data_name>_<decoder>_<encoder>[_finetune]"),
    "overwrite": (False, (bool,), "let a fresh run replace the checkpoints of an earlier run of the same name"),
    "seed": (0, (int,), "seed of weights, shuffling and dropout"),
    "group_captions": (True, (bool,), "batches of images with all their captions (False: the course's per caption)"),
    "feature_cache": (True, (bool,), "with a frozen encoder, encode every image once into a float16 cache"),
    "cache_folder": (None, (str, NONE), "where feature caches go; None: data_folder"),
    "deterministic": (False, (bool,), "deterministic kernels (bitwise-repeatable runs and resumes; slower)"),
    "mixed_precision": (None, (bool, NONE), "bf16/fp16 autocast; None: on for CUDA, off on CPU"),
    "channels_last": (None, (bool, NONE), "encoder in channels_last memory layout while training; None: on for CUDA, off on the CPU"),
    "cuda_graphs": (None, (bool, NONE), "replay the decoder's teacher-forced pass as CUDA graphs; None: the recurrent decoders' on one CUDA GPU, True: the Transformer's too (cuda_graphs.py)"),
    "lr_warmup_steps": (None, (int, NONE), "linear learning-rate warm-up over this many steps; None: 20000 for "
                                           "decoders that need one (transformer), 0 for the others"),
    # The second stage: self-critical sequence training (Rennie et al. 2017) with a CIDEr-D (+ CLIP-S) reward
    "training": ("xe", (str,), "xe (cross-entropy, teacher forcing) or scst (self-critical, CIDEr-D reward; "
                               "see scst_reward)"),
    "scst_samples": (5, (int,), "captions sampled per image in an SCST step"),
    "scst_baseline": ("mean", (str,), "SCST baseline: mean (of the image's other samples) or greedy"),
    "scst_lr": (2e-5, (float, int), "decoder learning rate of the SCST stage (self-critical.pytorch's 2e-5: "
                                    "small policy-gradient steps keep the XE model from falling apart)"),
    "scst_reward": ("cider", (str,), "SCST reward: cider (CIDEr-D) or cider+clips (CIDEr-D + clip_reward_weight x "
                                     "CLIP-S of the caption and its image, Cho et al. 2022)"),
    "clip_reward_weight": (1.0, (float, int), "weight of CLIP-S in the cider+clips reward, 0 or more"),
    "clip_reward_model": (DEFAULT_CLIP_MODEL, (str,), "CLIP model of the cider+clips reward, <open_clip model>:"
                                                      "<pretrained tag or state_dict file>; its weights must be at "
                                                      "hand (a file or Hugging Face's cache)"),
    "val_metric": (None, (str, NONE), "bleu4 (teacher-forced, the course's) or cider (greedy decoding); "
                                      "None: bleu4 for xe, cider for scst"),
    "max_steps": (50, (int,), "longest caption that SCST sampling and greedy validation decode"),
}
REQUIRED_KEYS = ("data_folder", "data_name")
# Keys that define the networks: a resumed run must agree with its checkpoint on them.
MODEL_KEYS = ("decoder", "encoder", "encoded_image_size", "embed_dim", "attention_dim", "decoder_dim",
              "transformer_layers", "transformer_encoder_layers", "transformer_heads", "transformer_ff_dim")
# Keys whose value is one of a few words.
CHOICES = {"training": ("xe", "scst"), "scst_baseline": ("mean", "greedy"), "scst_reward": ("cider", "cider+clips"),
           "val_metric": ("bleu4", "cider")}
POSITIVE_INTS = ("epochs", "batch_size", "encoded_image_size", "embed_dim", "attention_dim", "decoder_dim",
                 "lr_decay_patience", "early_stop_patience", "scst_samples", "max_steps", "transformer_layers",
                 "transformer_heads", "transformer_ff_dim", "scheduled_sampling_increase_every")
NON_NEGATIVE_INTS = ("start_epoch", "epochs_since_improvement", "print_freq", "workers", "lr_warmup_steps",
                     "transformer_encoder_layers")
POSITIVE_RATES = ("encoder_lr", "decoder_lr", "scst_lr")


def default_cfg():
    """The cfg with every key at its default (data_folder and data_name still to fill in)."""
    return {key: default for key, (default, _, _) in CFG_SCHEMA.items()}


def validate_cfg(cfg):
    """Check a user's cfg (unknown keys, types, values) and return it completed with the defaults."""
    if not isinstance(cfg, dict):
        raise ToolkitError(f"the cfg must be a dict of key -> value, got a {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(CFG_SCHEMA))
    if unknown:
        raise ToolkitError(f"unknown cfg key(s) {', '.join(map(repr, unknown))}; the keys are: {', '.join(CFG_SCHEMA)}")
    for key, value in cfg.items():
        check_type(key, value)
    for key in REQUIRED_KEYS:
        if cfg.get(key) is None:
            raise ToolkitError(f"cfg[{key!r}] is required ({CFG_SCHEMA[key][2]})")
    full = dict(default_cfg(), **cfg)
    full["decoder"] = resolve_decoder(cfg)
    full["attention"] = full["decoder"] != "rnn"
    full["device"] = str(pick_device(full["device"]))
    if full["val_metric"] is None:
        full["val_metric"] = "cider" if full["training"] == "scst" else "bleu4"
    if full["lr_warmup_steps"] is None:
        full["lr_warmup_steps"] = DEFAULT_WARMUP_STEPS if DECODERS[full["decoder"]].lr_warmup else 0
    check_values(full)
    return full


def check_type(key, value):
    types = CFG_SCHEMA[key][1]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        allowed = " or ".join("None" if t is NONE else t.__name__ for t in types)
        raise ToolkitError(f"cfg[{key!r}] = {value!r} has type {type(value).__name__}; expected {allowed}")


def model_cfg_problem(cfg):
    """What is wrong with a checkpoint's completed cfg before the models are built from it, as (what it holds,
    what it should hold); None when every key has its schema's type and the keys that shape the models have
    values they can be built with."""
    for key, value in cfg.items():
        default, types, _ = CFG_SCHEMA[key]
        if value is default:  # a key upgrade_cfg added (data_folder and data_name default to None)
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            allowed = " or ".join("None" if t is NONE else t.__name__ for t in types)
            return f"cfg[{key!r}] = {value!r} ({type(value).__name__})", f"a value of type {allowed}"
    decoder = cfg["decoder"] if cfg["decoder"] is not None else ("attention" if cfg["attention"] else "rnn")
    if decoder not in DECODERS:
        return f"cfg['decoder'] = {decoder!r}", f"one of {', '.join(DECODERS)}"
    if cfg["encoder"] not in BACKBONES:
        return f"cfg['encoder'] = {cfg['encoder']!r}", f"one of {', '.join(BACKBONES)}"
    for key in MODEL_KEYS:
        least = 1 if key in POSITIVE_INTS else 0 if key in NON_NEGATIVE_INTS else None
        if least is not None and cfg[key] < least:
            return f"cfg[{key!r}] = {cfg[key]!r}", f"a whole number of at least {least}"
    if decoder == "transformer" and cfg["decoder_dim"] % cfg["transformer_heads"]:
        return (f"cfg['decoder_dim'] = {cfg['decoder_dim']!r}",
                f"a multiple of cfg['transformer_heads'] = {cfg['transformer_heads']}")
    return None


def check_values(cfg):
    """Refuse values of the right type that cannot work (before any work is spent)."""
    def refuse(key, rule):
        raise ToolkitError(f"cfg[{key!r}] = {cfg[key]!r} {rule}")

    for key, choices in CHOICES.items():
        if cfg[key] is not None and cfg[key] not in choices:
            refuse(key, f"is not one of {', '.join(choices)}")
    for key in POSITIVE_INTS:
        if cfg[key] < 1:
            refuse(key, "must be at least 1")
    for key in NON_NEGATIVE_INTS:
        if cfg[key] is not None and cfg[key] < 0:
            refuse(key, "must be 0 or more" + (" (0: load data in the main process)" if key == "workers" else ""))
    for key in POSITIVE_RATES:
        if not (math.isfinite(cfg[key]) and cfg[key] > 0):
            refuse(key, "must be a positive, finite learning rate")
    if cfg["grad_clip"] is not None and not (math.isfinite(cfg["grad_clip"]) and cfg["grad_clip"] > 0):
        refuse("grad_clip", "must be positive (clip gradients to [-grad_clip, grad_clip]) or None (no clipping)")
    if not (math.isfinite(cfg["alpha_c"]) and cfg["alpha_c"] >= 0):
        refuse("alpha_c", "must be 0 or more")
    if not (math.isfinite(cfg["best_bleu4"]) and cfg["best_bleu4"] >= 0):
        refuse("best_bleu4", "must be 0 or more")
    if not (math.isfinite(cfg["clip_reward_weight"]) and cfg["clip_reward_weight"] >= 0):
        refuse("clip_reward_weight", "must be a finite weight, 0 or more (reward = CIDEr-D + weight x CLIP-S)")
    if cfg["training"] == "scst" and cfg["scst_reward"] == "cider+clips":
        weights_path(cfg["clip_reward_model"], "clip_reward_model")  # the CLIP weights at hand, or why not
    if not 0 < cfg["lr_decay_factor"] <= 1:
        refuse("lr_decay_factor", "must be in (0, 1]")
    for key in ("dropout", "transformer_dropout", "label_smoothing"):
        if not 0 <= cfg[key] < 1:
            refuse(key, "must be in [0, 1)")
    if cfg["scheduled_sampling_start"] < -1:
        refuse("scheduled_sampling_start", "must be -1 (no scheduled sampling) or the epoch it starts at (0 or more)")
    for key in ("scheduled_sampling_increase_prob", "scheduled_sampling_max_prob"):
        if not 0 <= cfg[key] <= 1:
            refuse(key, "must be a probability in [0, 1]")
    if cfg["training"] == "scst" and cfg["scheduled_sampling_start"] >= 0:
        refuse("scheduled_sampling_start", "turns on scheduled sampling in the XE stage; SCST feeds the sampled words "
                                           "always: set it to -1")
    if cfg["training"] == "scst" and cfg["label_smoothing"]:
        refuse("label_smoothing", "smooths the cross-entropy of training 'xe'; SCST has no cross-entropy: set it to 0")
    if cfg["decoder_dim"] % cfg["transformer_heads"] and cfg["decoder"] == "transformer":
        refuse("decoder_dim", f"must be a multiple of transformer_heads = {cfg['transformer_heads']}")
    if cfg["training"] == "scst" and cfg["scst_baseline"] == "mean" and cfg["scst_samples"] < 2:
        refuse("scst_samples", "must be at least 2 with scst_baseline 'mean' (the baseline of a sample is the mean "
                               "of the image's other samples)")
    if (cfg["training"] == "scst" or cfg["val_metric"] == "cider") and not cfg["group_captions"]:
        refuse("group_captions", "must be True for SCST and for val_metric 'cider' (they decode per image)")
    if cfg["checkpoint"] is None and cfg["start_epoch"] >= cfg["epochs"]:
        refuse("start_epoch", f"leaves nothing to train: epochs = {cfg['epochs']}; raise epochs or lower start_epoch")


def resolve_decoder(cfg):
    """cfg['decoder'], or the course's cfg['attention'] switch mapped onto it; they must agree."""
    decoder = cfg.get("decoder")
    if decoder is None:
        return "attention" if cfg.get("attention") else "rnn"
    if decoder not in DECODERS:
        raise ToolkitError(f"cfg['decoder'] = {decoder!r}; use one of {', '.join(DECODERS)}")
    if "attention" in cfg and cfg["attention"] != (decoder != "rnn"):
        raise ToolkitError(f"cfg['attention'] = {cfg['attention']} contradicts cfg['decoder'] = {decoder!r}; "
                           f"drop one of them")
    return decoder


def pick_device(device):
    """torch.device from cfg: None -> cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ToolkitError(f"cfg['device'] = {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:1' "
                           f"or None (cuda when available)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolkitError(f"cfg['device'] = {str(device)!r} but no CUDA device is available; use 'cpu' or None")
    if device.type not in ("cpu", "cuda"):
        raise ToolkitError(f"cfg['device'] = {str(device)!r}: this toolkit runs on 'cpu' or 'cuda' devices")
    return device


def with_env_overrides(cfg, variable="CAPTIONING_CFG"):
    """cfg updated with the JSON object in the environment variable (how tests point notebooks at tiny data)."""
    text = os.environ.get(variable)
    if not text:
        return cfg
    try:
        overrides = json.loads(text)
    except ValueError as error:
        raise ToolkitError(f"environment variable {variable} is not valid JSON ({error}); set it to a JSON "
                           f"object such as '{{\"epochs\": 1}}'") from None
    if not isinstance(overrides, dict):
        raise ToolkitError(f"environment variable {variable} holds a JSON {type(overrides).__name__}, not an "
                           f"object of cfg key -> value such as '{{\"epochs\": 1}}'")
    return dict(cfg, **overrides)


_upgrade_notes = set()  # the notes upgrade_cfg printed in this process: each is said once


def print_once(note):
    if note not in _upgrade_notes:
        _upgrade_notes.add(note)
        print(note)


def upgrade_cfg(saved, source):
    """A checkpoint's cfg completed with the keys added since it was written (their defaults, said once per
    process); keys this version no longer knows are dropped, with a note."""
    missing = [key for key in CFG_SCHEMA if key not in saved]
    dropped = [key for key in saved if key not in CFG_SCHEMA]
    if missing:
        print_once(f"note: {source!r} was written by an earlier version of the toolkit; these cfg keys take their "
                   f"defaults: {', '.join(f'{key}={CFG_SCHEMA[key][0]!r}' for key in missing)}")
    if dropped:
        print_once(f"note: {source!r} has cfg keys this version does not know, ignored: {', '.join(dropped)}")
    return {**default_cfg(), **{key: value for key, value in saved.items() if key in CFG_SCHEMA}}


# ---------------------------------------------------------------- command line

def add_cfg_options(parser):
    """One option per cfg key, dashes for underscores; booleans as --key/--no-key; --self-critical for
    --training scst."""
    parser.add_argument("--self-critical", dest="training", action="store_const", const="scst",
                        default=argparse.SUPPRESS, help="the SCST stage: same as --training scst")
    for key, (default, types, meaning) in CFG_SCHEMA.items():
        option = "--" + key.replace("_", "-")
        if bool in types:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{meaning} (default {default})")
        else:
            kind = next(t for t in types if t is not NONE)
            kind = str if kind is torch.device else kind
            parser.add_argument(option, type=none_or(kind), default=argparse.SUPPRESS,
                                help=f"{meaning} (default {default})")


def none_or(kind):
    """An argparse type: 'none' -> None, anything else -> kind(text)."""
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse
