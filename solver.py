"""Training (teacher forcing) and testing (beam search) of the captioning models.

From Python: `train(cfg)`, `test(checkpoint)`, `caption(checkpoint, images)`, `compare(checkpoints)`.
From the shell: `python solver.py {train,test,caption,compare,cache-features} --help`.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm.auto import tqdm

from beam_search import beam_search
from datasets import (CaptionDataset, ImageCaptionsDataset, check_data_files, load_references, load_word_map,
                      normalize_images)
from features import ensure_feature_cache
from figures import visualize_att
from models import DecoderWithAdaptiveAttention, DecoderWithAttention, DecoderWithRNN, Encoder
from utils import (ToolkitError, atomic_path, coco_caption_metrics, course_bleu, format_metrics, load_checkpoint,
                   results_table, run_cli, save_checkpoint)

DECODERS = ("rnn", "attention", "adaptive")
SPECIAL_WORDS = ("<start>", "<end>", "<pad>")

# The seed's cfg keys (section 2.2) and the toolkit's own: key -> (default, allowed types, meaning).
CFG_SCHEMA = {
    # Data
    "data_folder": (None, (str,), "folder holding the files of create_input_files.py (required)"),
    "data_name": (None, (str,), "base name of the data files, e.g. coco_5_cap_per_img_5_min_word_freq (required)"),
    # Model
    "decoder": (None, (str, type(None)), "rnn, attention or adaptive; None follows `attention`"),
    "attention": (False, (bool,), "the course's switch: True trains the attention decoder"),
    "encoder": ("resnet101", (str,), "backbone of the encoder (see models.BACKBONES)"),
    "encoder_weights": ("IMAGENET1K_V1", (str, type(None)), "torchvision weights name, a state_dict file, or None"),
    "encoded_image_size": (14, (int,), "side of the encoder's output grid"),
    "embed_dim": (512, (int,), "dimension of word embeddings"),
    "attention_dim": (512, (int,), "dimension of attention linear layers"),
    "decoder_dim": (512, (int,), "dimension of decoder RNN"),
    "dropout": (0.5, (float, int), "dropout before the output layer"),
    "device": (None, (str, torch.device, type(None)), "cpu, cuda, cuda:1...; None picks cuda when available"),
    # Training
    "start_epoch": (0, (int,), "first epoch of a fresh run (a resumed run continues after its checkpoint)"),
    "epochs": (10, (int,), "number of epochs to train for (if early stopping is not triggered)"),
    "epochs_since_improvement": (0, (int,), "epochs since the last improvement of val BLEU-4 at the start"),
    "batch_size": (32, (int,), "captions per batch (grouped: batch_size // captions_per_image images)"),
    "workers": (None, (int, type(None)), "DataLoader worker processes; None: min(4, CPU cores)"),
    "encoder_lr": (1e-4, (float, int), "learning rate for the encoder if fine-tuning"),
    "decoder_lr": (4e-4, (float, int), "learning rate for the decoder"),
    "grad_clip": (5.0, (float, int, type(None)), "clip gradients at this absolute value; None: no clipping"),
    "alpha_c": (1.0, (float, int), "weight of the doubly stochastic attention regularisation"),
    "best_bleu4": (0.0, (float, int), "best val BLEU-4 so far at the start"),
    "print_freq": (100, (int,), "print training stats every this many batches (0: never)"),
    "fine_tune_encoder": (False, (bool,), "fine-tune blocks 2-4 of the encoder"),
    "checkpoint": (None, (str, type(None)), "checkpoint to resume from; None starts fresh"),
    "lr_decay_factor": (0.8, (float, int), "learning rates are multiplied by this ..."),
    "lr_decay_patience": (8, (int,), "... after every this many epochs without improvement"),
    "early_stop_patience": (20, (int,), "stop after this many epochs without improvement"),
    "output_folder": ("checkpoints", (str,), "where checkpoints are written"),
    "run_name": (None, (str, type(None)), "names the checkpoints; None: <data_name>_<decoder>_<encoder>[_finetune]"),
    "overwrite": (False, (bool,), "let a fresh run replace the checkpoints of an earlier run of the same name"),
    "seed": (0, (int,), "seed of weights, shuffling and dropout"),
    "group_captions": (True, (bool,), "batches of images with all their captions (False: the course's per caption)"),
    "feature_cache": (True, (bool,), "with a frozen encoder, encode every image once into a float16 cache"),
    "cache_folder": (None, (str, type(None)), "where feature caches go; None: data_folder"),
    "deterministic": (False, (bool,), "deterministic kernels (bitwise-repeatable runs and resumes; slower)"),
    "mixed_precision": (None, (bool, type(None)), "bf16/fp16 autocast; None: on for CUDA, off on CPU"),
    "channels_last": (None, (bool, type(None)), "channels_last encoder; None: on for CUDA, off on CPU"),
}
REQUIRED_KEYS = ("data_folder", "data_name")
# Keys that define the networks: a resumed run must agree with its checkpoint on them.
MODEL_KEYS = ("decoder", "encoder", "encoded_image_size", "embed_dim", "attention_dim", "decoder_dim")


def default_cfg():
    """The cfg with every key at its default (data_folder and data_name still to fill in)."""
    return {key: default for key, (default, _, _) in CFG_SCHEMA.items()}


def validate_cfg(cfg):
    """Check a user's cfg (unknown keys, types, values) and return it completed with the defaults."""
    unknown = sorted(set(cfg) - set(CFG_SCHEMA))
    if unknown:
        raise ToolkitError(f"unknown cfg key(s) {', '.join(map(repr, unknown))}; the keys are: {', '.join(CFG_SCHEMA)}")
    for key, value in cfg.items():
        types = CFG_SCHEMA[key][1]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            allowed = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise ToolkitError(f"cfg[{key!r}] = {value!r} has type {type(value).__name__}; expected {allowed}")
    for key in REQUIRED_KEYS:
        if cfg.get(key) is None:
            raise ToolkitError(f"cfg[{key!r}] is required ({CFG_SCHEMA[key][2]})")
    full = dict(default_cfg(), **cfg)
    full["decoder"] = resolve_decoder(cfg)
    full["attention"] = full["decoder"] != "rnn"
    full["device"] = str(pick_device(full["device"]))
    for key in ("epochs", "batch_size", "encoded_image_size", "embed_dim", "attention_dim", "decoder_dim"):
        if full[key] < 1:
            raise ToolkitError(f"cfg[{key!r}] = {full[key]} must be at least 1")
    if not 0 <= full["dropout"] < 1:
        raise ToolkitError(f"cfg['dropout'] = {full['dropout']} must be in [0, 1)")
    return full


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
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolkitError(f"cfg['device'] = {str(device)!r} but no CUDA device is available; use 'cpu' or None")
    return device


def with_env_overrides(cfg, variable="CAPTIONING_CFG"):
    """cfg updated with the JSON object in the environment variable (how tests point notebooks at tiny data)."""
    text = os.environ.get(variable)
    if not text:
        return cfg
    try:
        overrides = json.loads(text)
    except ValueError as error:
        raise ToolkitError(f"environment variable {variable} is not a JSON object: {error}") from None
    return dict(cfg, **overrides)


# ---------------------------------------------------------------- models


def build_encoder(cfg, weights):
    return Encoder(cfg["encoded_image_size"], backbone=cfg["encoder"], weights=weights)


def build_decoder(cfg, vocab_size, encoder_dim):
    """The decoder that cfg['decoder'] names, sized for the encoder's channels."""
    if cfg["decoder"] == "rnn":
        return DecoderWithRNN(cfg["embed_dim"], cfg["decoder_dim"], vocab_size, encoder_dim, cfg["dropout"])
    decoder_class = DecoderWithAttention if cfg["decoder"] == "attention" else DecoderWithAdaptiveAttention
    return decoder_class(cfg["attention_dim"], cfg["embed_dim"], cfg["decoder_dim"], vocab_size, encoder_dim,
                         cfg["dropout"])


def load_models(checkpoint, device):
    """Encoder and decoder of a checkpoint dict, in eval mode on `device`."""
    cfg = checkpoint["cfg"]
    encoder = build_encoder(cfg, weights=None)
    encoder.load_state_dict(checkpoint["encoder_state"])
    decoder = build_decoder(cfg, len(checkpoint["word_map"]), encoder.encoder_dim)
    decoder.load_state_dict(checkpoint["decoder_state"])
    return encoder.to(device).eval(), decoder.to(device).eval()


def make_optimizer(parameters, lr):
    parameters = [p for p in parameters if p.requires_grad]
    return torch.optim.Adam(parameters, lr=lr) if parameters else None


def scale_learning_rate(optimizer, factor):
    """Multiply every learning rate of an optimizer (the course's adjust_learning_rate)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["lr"] *= factor
    print(f"The new learning rate is {optimizer.param_groups[0]['lr']:.6g}")


# ---------------------------------------------------------------- losses and metrics


def caption_loss(scores, targets, decode_lengths, alphas, alpha_c, decoder_name):
    """Cross-entropy over the real (unpadded) positions plus doubly stochastic attention regularisation.

    Returns the loss and the packed scores (K, V) and targets (K,) of the real positions.
    """
    scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
    targets = pack_padded_sequence(targets, decode_lengths, batch_first=True).data
    loss = F.cross_entropy(scores, targets)
    if decoder_name == "attention" and alpha_c:
        loss = loss + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    return loss, scores, targets


def top5_accuracy(scores, targets):
    """Percentage of positions whose target is among the 5 highest scores."""
    k = min(5, scores.size(1))
    correct = scores.topk(k, dim=1).indices.eq(targets.unsqueeze(1)).any(dim=1)
    return correct.float().mean().item() * 100.0


def strip_special(caption, word_map):
    """Word ids without <start>, <end> and <pad>."""
    special = {word_map[word] for word in SPECIAL_WORDS}
    return [w for w in caption if w not in special]


class Average:
    """Running average weighted by counts."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, count=1):
        self.sum += value * count
        self.count += count

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


# ---------------------------------------------------------------- training


class Trainer:
    """Holds the state of one training run; `run()` trains epoch by epoch, as train(cfg) does."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device(cfg["device"])
        self.cuda = self.device.type == "cuda"
        check_data_files(cfg["data_folder"], cfg["data_name"], ("TRAIN", "VAL"))
        self.word_map = load_word_map(cfg["data_folder"], cfg["data_name"])
        resume = load_checkpoint(cfg["checkpoint"]) if cfg["checkpoint"] else None
        if resume is not None:
            self.check_resume(resume)
        self.paths = checkpoint_paths(cfg)
        if resume is None:
            self.refuse_to_overwrite()
        torch.manual_seed(cfg["seed"])
        self.encoder = build_encoder(cfg, weights=None if resume else cfg["encoder_weights"])
        self.decoder = build_decoder(cfg, len(self.word_map), self.encoder.encoder_dim)
        self.mixed_precision = self.cuda if cfg["mixed_precision"] is None else cfg["mixed_precision"] and self.cuda
        self.channels_last = self.cuda if cfg["channels_last"] is None else cfg["channels_last"] and self.cuda
        self.amp_dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mixed_precision and self.amp_dtype == torch.float16)
        self.state = {"epoch": cfg["start_epoch"] - 1, "best_bleu4": float(cfg["best_bleu4"]),
                      "epochs_since_improvement": cfg["epochs_since_improvement"], "history": empty_history()}
        if resume is not None:
            self.encoder.load_state_dict(resume["encoder_state"])
            self.decoder.load_state_dict(resume["decoder_state"])
        self.encoder.fine_tune(cfg["fine_tune_encoder"])
        self.encoder.to(self.device)
        self.decoder.to(self.device)
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        # Optimisers after the move: their state must live on the parameters' device.
        self.decoder_optimizer = make_optimizer(self.decoder.parameters(), cfg["decoder_lr"])
        self.encoder_optimizer = (make_optimizer(self.encoder.parameters(), cfg["encoder_lr"])
                                  if cfg["fine_tune_encoder"] else None)
        if resume is not None:
            self.restore(resume)
        self.image_size = None
        self.train_loader, self.val_loader = self.make_loaders()

    def refuse_to_overwrite(self):
        """A fresh run must not silently replace the best checkpoint of an earlier run of the same name."""
        if os.path.exists(self.paths["best"]) and not self.cfg["overwrite"]:
            raise ToolkitError(
                f"{self.paths['best']!r} already holds a run named {self.paths['name']!r}; resume it with "
                f"cfg['checkpoint'] = {self.paths['last']!r} (--checkpoint), give this run another "
                f"cfg['run_name'] (--run-name), or set cfg['overwrite'] = True (--overwrite) to replace it")

    def check_resume(self, checkpoint):
        saved = checkpoint["cfg"]
        for key in MODEL_KEYS:
            if saved[key] != self.cfg[key]:
                raise ToolkitError(f"cfg[{key!r}] = {self.cfg[key]!r} but checkpoint {self.cfg['checkpoint']!r} was "
                                   f"trained with {saved[key]!r}; use the checkpoint's value to resume")
        if checkpoint["word_map"] != self.word_map:
            raise ToolkitError(word_map_mismatch(self.cfg["checkpoint"], self.cfg["data_folder"], self.cfg["data_name"]))
        if checkpoint["encoder_optimizer"] is not None and not self.cfg["fine_tune_encoder"]:
            print("note: the checkpoint fine-tunes its encoder, so fine-tuning goes on (fine_tune_encoder = True)")
            self.cfg["fine_tune_encoder"] = True

    def restore(self, checkpoint):
        """Continue from a checkpoint: optimiser states, counters and history (weights are loaded already)."""
        self.decoder_optimizer.load_state_dict(checkpoint["decoder_optimizer"])
        if checkpoint["encoder_optimizer"] is not None:
            self.encoder_optimizer.load_state_dict(checkpoint["encoder_optimizer"])
        for key in ("epoch", "best_bleu4", "epochs_since_improvement", "history"):
            self.state[key] = checkpoint[key]
        print(f"Resuming from {self.cfg['checkpoint']!r} after epoch {checkpoint['epoch']}")

    @property
    def uses_cache(self):
        cfg = self.cfg
        return cfg["group_captions"] and cfg["feature_cache"] and not cfg["fine_tune_encoder"]

    def make_loaders(self):
        """Train and val DataLoaders: grouped images (or cached features) with all their captions,
        or the course's one caption per item."""
        cfg = self.cfg
        workers = cfg["workers"] if cfg["workers"] is not None else min(4, os.cpu_count() or 1)
        options = {"num_workers": workers, "pin_memory": self.cuda, "persistent_workers": workers > 0}
        if not cfg["group_captions"]:
            train = CaptionDataset(cfg["data_folder"], cfg["data_name"], "TRAIN")
            val = CaptionDataset(cfg["data_folder"], cfg["data_name"], "VAL")
            batch = cfg["batch_size"]
        else:
            features = {split: self.feature_file(split, workers) if self.uses_cache else None
                        for split in ("TRAIN", "VAL")}
            train = ImageCaptionsDataset(cfg["data_folder"], cfg["data_name"], "TRAIN", features["TRAIN"])
            val = ImageCaptionsDataset(cfg["data_folder"], cfg["data_name"], "VAL", features["VAL"])
            batch = max(1, cfg["batch_size"] // train.captions_per_image)
        self.image_size = int(train.image(0).shape[-1])
        # BatchNorm cannot train on a last batch of one image.
        drop_last = len(train) % batch == 1
        self.shuffle = torch.Generator()
        train_loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, drop_last=drop_last,
                                                   generator=self.shuffle, **options)
        val_loader = torch.utils.data.DataLoader(val, batch_size=batch, **options)
        return train_loader, val_loader

    def feature_file(self, split, workers):
        cfg = self.cfg
        self.encoder.eval()
        return ensure_feature_cache(self.encoder, cfg["data_folder"], cfg["data_name"], split, cfg["cache_folder"],
                                    batch_size=max(1, cfg["batch_size"]), workers=workers, device=self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.mixed_precision)

    def encode(self, inputs):
        """A batch from the loader -> (B, P, C) encodings: cached features, or the encoder on the images."""
        inputs = inputs.to(self.device, non_blocking=True)
        if inputs.dtype == torch.float16:  # cached features
            return inputs.float()
        if inputs.dtype == torch.uint8:
            inputs = normalize_images(inputs)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        grid = self.encoder(inputs)  # (B, G, G, C)
        return grid.reshape(grid.size(0), -1, grid.size(-1)).float()

    def forward_batch(self, batch):
        """Loss, packed scores and targets, sorted captions and decode lengths of one batch."""
        inputs, captions, lengths = batch[:3]
        captions, lengths = captions.to(self.device), lengths.to(self.device)
        with self.autocast():
            encoder_out = self.encode(inputs)
            caption_image = None
            if captions.dim() == 3:  # grouped: (B, cpi, L) -> (B * cpi, L)
                per_image = captions.size(1)
                caption_image = torch.arange(captions.size(0), device=self.device).repeat_interleave(per_image)
                captions, lengths = captions.reshape(-1, captions.size(2)), lengths.reshape(-1)
            scores, captions_sorted, decode_lengths, alphas, sort_ind = self.decoder(
                encoder_out, captions, lengths, caption_image)
            loss, packed_scores, targets = caption_loss(scores.float(), captions_sorted[:, 1:], decode_lengths,
                                                        alphas, self.cfg["alpha_c"], self.cfg["decoder"])
        return loss, packed_scores, targets, scores, decode_lengths, sort_ind, caption_image

    def train_epoch(self, epoch):
        cfg = self.cfg
        self.decoder.train()
        self.encoder.train(cfg["fine_tune_encoder"])  # a frozen encoder keeps its BatchNorm statistics
        losses, top5 = Average(), Average()
        self.shuffle.manual_seed(cfg["seed"] * 100_003 + epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch} train", unit="batch")
        for i, batch in enumerate(bar):
            loss, scores, targets = self.forward_batch(batch)[:3]
            self.check_finite(loss, epoch, i)
            self.step(loss)
            losses.update(loss.item(), targets.numel())
            top5.update(top5_accuracy(scores.detach(), targets), targets.numel())
            bar.set_postfix(loss=f"{losses.avg:.3f}", top5=f"{top5.avg:.2f}", refresh=False)
            if cfg["print_freq"] and (i + 1) % cfg["print_freq"] == 0:
                bar.write(f"Epoch: [{epoch}][{i + 1}/{len(self.train_loader)}]\tLoss {losses.avg:.4f}\t"
                          f"Top-5 Accuracy {top5.avg:.3f}")
        return losses.avg, top5.avg

    def check_finite(self, loss, epoch, batch):
        if not torch.isfinite(loss):
            raise ToolkitError(f"the loss became {loss.item()} at epoch {epoch}, batch {batch}; training stopped and "
                               f"the last good checkpoint {self.paths['last']!r} (if any) is untouched. Lower "
                               f"decoder_lr/encoder_lr, set grad_clip, or turn mixed_precision off")

    def step(self, loss):
        optimizers = [o for o in (self.decoder_optimizer, self.encoder_optimizer) if o is not None]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg["grad_clip"] is not None:
            for optimizer in optimizers:
                self.scaler.unscale_(optimizer)
                for group in optimizer.param_groups:
                    torch.nn.utils.clip_grad_value_(group["params"], self.cfg["grad_clip"])
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    @torch.no_grad()
    def validate(self, epoch):
        """Val loss, top-5 accuracy and the course's BLEU-4 of teacher-forced predictions against all the
        captions of each image."""
        self.decoder.eval()
        self.encoder.eval()
        losses, top5 = Average(), Average()
        references, hypotheses = [], []
        for batch in tqdm(self.val_loader, desc=f"epoch {epoch} val", unit="batch"):
            loss, scores, targets, padded_scores, decode_lengths, sort_ind, caption_image = self.forward_batch(batch)
            losses.update(loss.item(), targets.numel())
            top5.update(top5_accuracy(scores, targets), targets.numel())
            all_captions = batch[3] if len(batch) == 4 else batch[1]  # (B, cpi, L)
            image_of = caption_image[sort_ind] if caption_image is not None else sort_ind
            predictions = padded_scores.argmax(dim=2).tolist()
            for image, prediction, length in zip(image_of.tolist(), predictions, decode_lengths):
                references.append([strip_special(c, self.word_map) for c in all_captions[image].tolist()])
                hypotheses.append(strip_special(prediction[:length], self.word_map))
        bleu4 = course_bleu(references, hypotheses)["bleu4"]
        return losses.avg, top5.avg, bleu4

    @contextlib.contextmanager
    def backend_settings(self):
        """cuDNN autotuning (or deterministic kernels) for this run only; the caller's settings come back."""
        saved = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
        deterministic = self.cfg["deterministic"]
        if deterministic and self.cuda:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.backends.cudnn.benchmark = self.cuda and not deterministic
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = saved[0]
            torch.use_deterministic_algorithms(saved[1])

    def run(self):
        with self.backend_settings():
            return self.run_epochs()

    def run_epochs(self):
        cfg, state = self.cfg, self.state
        for epoch in range(state["epoch"] + 1, cfg["epochs"]):
            if state["epochs_since_improvement"] >= cfg["early_stop_patience"]:
                print(f"No improvement for {state['epochs_since_improvement']} epochs: early stop")
                break
            if state["epochs_since_improvement"] > 0 and state["epochs_since_improvement"] % cfg["lr_decay_patience"] == 0:
                scale_learning_rate(self.decoder_optimizer, cfg["lr_decay_factor"])
                scale_learning_rate(self.encoder_optimizer, cfg["lr_decay_factor"])
            torch.manual_seed(cfg["seed"] * 100_003 + epoch)  # dropout: the same whether resumed or not
            started = time.time()
            train_loss, train_top5 = self.train_epoch(epoch)
            val_loss, val_top5, bleu4 = self.validate(epoch)
            print(f"\n * LOSS - {val_loss:.3f}, TOP-5 ACCURACY - {val_top5:.3f}, BLEU-4 - {bleu4:.4f}\n")
            is_best = bleu4 > state["best_bleu4"]
            state["best_bleu4"] = max(bleu4, state["best_bleu4"])
            state["epochs_since_improvement"] = 0 if is_best else state["epochs_since_improvement"] + 1
            state["epoch"] = epoch
            record = {"epoch": epoch, "train_loss": train_loss, "train_top5": train_top5, "val_loss": val_loss,
                      "val_top5": val_top5, "val_bleu4": bleu4, "lr": self.decoder_optimizer.param_groups[0]["lr"],
                      "seconds": time.time() - started}
            for key, value in record.items():
                state["history"][key].append(value)
            self.save(is_best)
        return {"best_checkpoint": self.paths["best"], "last_checkpoint": self.paths["last"],
                "history": state["history"], "best_bleu4": state["best_bleu4"]}

    def save(self, is_best):
        cfg = dict(self.cfg, checkpoint=None)
        checkpoint = {"cfg": cfg, "word_map": self.word_map, "image_size": self.image_size,
                      "encoder_state": self.encoder.state_dict(), "decoder_state": self.decoder.state_dict(),
                      "encoder_optimizer": None if self.encoder_optimizer is None else self.encoder_optimizer.state_dict(),
                      "decoder_optimizer": self.decoder_optimizer.state_dict(), **self.state}
        os.makedirs(cfg["output_folder"], exist_ok=True)
        save_checkpoint(checkpoint, self.paths["last"])
        if is_best:
            save_checkpoint(checkpoint, self.paths["best"])


def empty_history():
    return {key: [] for key in ("epoch", "train_loss", "train_top5", "val_loss", "val_top5", "val_bleu4", "lr",
                                "seconds")}


def checkpoint_paths(cfg):
    """Paths of the last and best checkpoints; the run name keeps different runs apart."""
    name = cfg["run_name"] or "_".join([cfg["data_name"], cfg["decoder"], cfg["encoder"]]
                                       + (["finetune"] if cfg["fine_tune_encoder"] else []))
    folder = cfg["output_folder"]
    return {"name": name, "last": os.path.join(folder, f"checkpoint_{name}.pth.tar"),
            "best": os.path.join(folder, f"BEST_checkpoint_{name}.pth.tar")}


def word_map_mismatch(checkpoint_path, data_folder, data_name):
    return (f"the word map of checkpoint {checkpoint_path!r} differs from WORDMAP_{data_name}.json in "
            f"{data_folder!r}; the checkpoint was trained on other data: use the data folder it was trained on")


def train(cfg):
    """Train a captioning model as cfg describes; returns the checkpoint paths and the history."""
    cfg = validate_cfg(cfg)
    return Trainer(cfg).run()


# ---------------------------------------------------------------- testing and captioning


def load_for_inference(checkpoint_path, device=None):
    """(checkpoint dict, encoder, decoder) on the chosen device, in eval mode."""
    device = pick_device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    encoder, decoder = load_models(checkpoint, device)
    return checkpoint, encoder, decoder


def decode_batch(encoder, decoder, images, word_map, beam_size, max_steps):
    """uint8 images (B, 3, S, S) on the model's device -> list of B Captions."""
    with torch.inference_mode():
        encoder_out = encoder(normalize_images(images))  # (B, G, G, C)
    return beam_search(decoder, encoder_out, word_map["<start>"], word_map["<end>"], beam_size, max_steps)


def test(checkpoint, beam_size=3, split="TEST", predictions_json=None, data_folder=None, batch_size=50,
         max_steps=50, blind=False, device=None, coco_metrics=True, workers=None):
    """Beam search over a split (no teacher forcing); prints and returns the scores.

    Returns a dict with the course's BLEU (`bleu1`..`bleu4`, nltk corpus_bleu against the split's
    captions) and, with coco_metrics, the coco-caption metrics against each image's full original
    references. `blind` replaces every image by a blank one (the language prior alone).
    """
    if beam_size < 1:
        raise ToolkitError(f"beam_size = {beam_size} must be at least 1")
    ckpt, encoder, decoder = load_for_inference(checkpoint, device)
    cfg = ckpt["cfg"]
    data_folder = data_folder or cfg["data_folder"]
    word_map = ckpt["word_map"]
    check_data_files(data_folder, cfg["data_name"], (split,))
    if load_word_map(data_folder, cfg["data_name"]) != word_map:
        raise ToolkitError(word_map_mismatch(checkpoint, data_folder, cfg["data_name"]))
    dataset = ImageCaptionsDataset(data_folder, cfg["data_name"], split)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    device = next(decoder.parameters()).device
    references, hypotheses = [], []
    for images, captions, _ in tqdm(loader, desc=f"beam search {split} (k={beam_size})", unit="batch"):
        images = torch.zeros_like(images) if blind else images
        for caption, image_captions in zip(decode_batch(encoder, decoder, images.to(device), word_map, beam_size,
                                                        max_steps), captions.tolist()):
            references.append([strip_special(c, word_map) for c in image_captions])
            hypotheses.append(strip_special(caption.words, word_map))
    scores, unavailable = course_bleu(references, hypotheses), {}
    words = {index: word for word, index in word_map.items()}
    sentences = [" ".join(words[w] for w in hypothesis) for hypothesis in hypotheses]
    refs = load_references(data_folder, cfg["data_name"], split, word_map)
    if coco_metrics:
        if refs.fallback:
            print(f"note: no REFS file for {split}; coco-caption metrics use the sampled encoded captions "
                  f"(re-run create_input_files.py to get the full references)")
        coco = coco_caption_metrics(dict(enumerate(sentences)),
                                    {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs.references)})
        scores.update(coco["scores"])
        unavailable = coco["unavailable"]
    print(f"{split} split, {len(hypotheses)} images, beam size {beam_size}. BLEU-n: the course's nltk corpus_bleu "
          f"against the split's captions; COCO-*: coco-caption against every original reference")
    for line in format_metrics(scores, unavailable):
        print(line)
    if predictions_json:
        with atomic_path(predictions_json) as tmp, open(tmp, "w", encoding="utf-8") as file:
            json.dump([{"image_id": image_id, "caption": sentence}
                       for image_id, sentence in zip(refs.image_ids, sentences)], file, indent=1)
    return scores


def read_image(path, image_size):
    """An image file -> uint8 tensor (3, S, S), resized like create_input_files does."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as error:
        raise ToolkitError(f"cannot read image {path!r}: {error}") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def caption(checkpoint, images, beam_size=3, max_steps=50, device=None):
    """Caption image files. Returns one dict per image: path, caption (str), words, alphas, betas.

    An unreadable image is reported and skipped (its entry has caption None and an error).
    """
    ckpt, encoder, decoder = load_for_inference(checkpoint, device)
    word_map = ckpt["word_map"]
    words = {index: word for word, index in word_map.items()}
    device = next(decoder.parameters()).device
    results = []
    for path in [images] if isinstance(images, str) else images:
        try:
            image = read_image(path, ckpt["image_size"])
        except ToolkitError as error:
            print(f"error: {error}", file=sys.stderr)
            results.append({"path": path, "caption": None, "error": str(error)})
            continue
        result = decode_batch(encoder, decoder, image.unsqueeze(0).to(device), word_map, beam_size, max_steps)[0]
        text = " ".join(words[w] for w in strip_special(result.words, word_map))
        results.append({"path": path, "caption": text, "words": [words[w] for w in result.words],
                        "seq": result.words, "alphas": result.alphas, "betas": result.betas,
                        "grid": ckpt["cfg"]["encoded_image_size"]})
    return results


def caption_figure(checkpoint, image_path, beam_size=3, smooth=True, out=None, device=None):
    """Caption one image and draw the course's figure: per-word attention panels (with beta_t for the
    adaptive decoder), or the image under its caption for the decoder without attention.
    Returns (caption text, matplotlib Figure); writes a PNG when `out` is given."""
    result = caption(checkpoint, [image_path], beam_size, device=device)[0]
    if result["caption"] is None:
        raise ToolkitError(result["error"])
    rev_word_map = dict(zip(result["seq"], result["words"]))
    figure = visualize_att(image_path, result["seq"], result["alphas"], rev_word_map, smooth=smooth, out=out,
                           betas=result["betas"])
    return result["caption"], figure


def compare(checkpoints, beam_size=3, split="TEST", out=None, **test_options):
    """Test several checkpoints and return (and print) a markdown table of all their metrics."""
    results = {}
    for path in checkpoints:
        cfg = load_checkpoint(path)["cfg"]
        scores = test(path, beam_size=beam_size, split=split, **test_options)
        label = os.path.basename(path)
        results[label] = dict(scores, decoder=cfg["decoder"], encoder=cfg["encoder"],
                              fine_tuned="yes" if cfg["fine_tune_encoder"] else "no", beam_size=beam_size)
    table = results_table(results)
    print(table)
    if out:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as file:
            file.write(table + "\n")
    return table


# ---------------------------------------------------------------- command line


def add_cfg_options(parser):
    """One option per cfg key, dashes for underscores."""
    for key, (default, types, meaning) in CFG_SCHEMA.items():
        option = "--" + key.replace("_", "-")
        if bool in types:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=meaning)
        else:
            kind = next(t for t in types if t is not type(None))
            kind = str if kind is torch.device else kind
            parser.add_argument(option, type=none_or(kind), default=argparse.SUPPRESS, help=f"{meaning} (default {default})")


def none_or(kind):
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_cfg_options(commands.add_parser("train", help="train a model (cfg keys as options)"))
    test_parser = commands.add_parser("test", help="beam search over a split and print BLEU and coco metrics")
    test_parser.add_argument("--checkpoint", required=True)
    test_parser.add_argument("--beam-size", type=int, default=3)
    test_parser.add_argument("--split", default="TEST", choices=("TRAIN", "VAL", "TEST"))
    test_parser.add_argument("--predictions-json")
    test_parser.add_argument("--data-folder", help="where the data is now, if it moved since training")
    test_parser.add_argument("--blind", action="store_true", help="blank images: what the language prior alone scores")
    caption_parser = commands.add_parser("caption", help="caption image files")
    caption_parser.add_argument("--checkpoint", required=True)
    caption_parser.add_argument("images", nargs="+")
    caption_parser.add_argument("--beam-size", type=int, default=3)
    compare_parser = commands.add_parser("compare", help="a markdown table of the metrics of several checkpoints")
    compare_parser.add_argument("checkpoints", nargs="+")
    compare_parser.add_argument("--beam-size", type=int, default=3)
    compare_parser.add_argument("--split", default="TEST", choices=("TRAIN", "VAL", "TEST"))
    compare_parser.add_argument("--out", help="also write the table to this markdown file")
    cache_parser = commands.add_parser("cache-features", help="build the frozen encoder's feature caches ahead of time")
    add_cfg_options(cache_parser)
    return parser


def cache_features(cfg):
    """Build the TRAIN and VAL feature caches that train(cfg) would use."""
    cfg = validate_cfg(cfg)
    if cfg["fine_tune_encoder"]:
        raise ToolkitError("a fine-tuned encoder changes during training: its features cannot be cached")
    check_data_files(cfg["data_folder"], cfg["data_name"], ("TRAIN", "VAL"))
    encoder = build_encoder(cfg, cfg["encoder_weights"]).to(cfg["device"]).eval()
    workers = cfg["workers"] if cfg["workers"] is not None else min(4, os.cpu_count() or 1)
    return [ensure_feature_cache(encoder, cfg["data_folder"], cfg["data_name"], split, cfg["cache_folder"],
                                 cfg["batch_size"], workers, cfg["device"]) for split in ("TRAIN", "VAL")]


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "train":
        train(args)
    elif command == "cache-features":
        for path in cache_features(args):
            print(path)
    elif command == "test":
        test(args["checkpoint"], args["beam_size"], args["split"], args["predictions_json"], args["data_folder"],
             blind=args["blind"])
    elif command == "caption":
        results = caption(args["checkpoint"], args["images"], args["beam_size"])
        for result in results:
            if result["caption"] is not None:
                print(f"{result['path']}: {result['caption']}")
        failed = [result["path"] for result in results if result["caption"] is None]
        if failed:
            raise ToolkitError(f"{len(failed)} of {len(results)} images could not be read: {', '.join(failed)}")
    elif command == "compare":
        compare(args["checkpoints"], args["beam_size"], args["split"], args["out"])


if __name__ == "__main__":
    run_cli(main)
