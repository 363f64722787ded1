"""The training loop: epochs of a training stage, validation, checkpoints, early stopping, learning rates.

`Trainer(cfg).run()` is what `solver.train(cfg)` does. Everything that could fail late (an output folder
that cannot be written, a disk too small for the checkpoints, a run of the same name in progress or
finished, a checkpoint that cannot resume) is checked before the first epoch. Each epoch writes
`BEST_checkpoint_<run>` (when the val metric improved) and then `checkpoint_<run>`, so a kill at any
moment loses at most the epoch in progress, and the last checkpoint never names a best epoch whose
weights are not in BEST.

Started by torchrun (distributed.py), every process trains one shard of each epoch with the decoder (and a
fine-tuned encoder) in DistributedDataParallel; rank 0 alone writes files and prints. `self.decoder` and
`self.encoder` are then the DDP wrappers (their forward all-reduces gradients in backward), and
`decoder_module`/`encoder_module` the plain modules (for decoding, state_dicts and checkpoints). SCST samples
through the plain decoder's start/one_step, which DDP does not see, so its gradients are all-reduced by
hand after backward (Ranks.average_gradients), in one flat buffer as DDP does.
"""
import contextlib
import math
import shlex
import os
import time

import torch
from tqdm.auto import tqdm

from checkpoints import (RunLock, RunPaths, check_resume_keys, checkpoint_bytes, empty_history, load_checkpoint,
                         run_name, save_checkpoint)
from config import CFG_SCHEMA, MODEL_KEYS, default_cfg, upgrade_cfg
from data_files import data_paths, feature_cache_path
from datasets import CaptionDataset, ImageCaptionsDataset, check_data_files, load_word_map
from distributed import Ranks, contiguous_slice, shard_indices, unwrapped
from encoding import training_layout
from features import (build_feature_cache, cache_problem, encoder_fingerprint, ensure_feature_cache,
                      join_feature_parts)
from images import normalize_images
from metrics import course_bleu
from models import build_decoder, build_encoder
from cider import CiderD
from run_log import RunLog
from sampling import greedy_captions
from training_steps import STAGES, TeacherForced, encoded_references, top5_accuracy
from utils import ToolkitError, check_free_space, check_writable_folder, remove_stale_temp_files
from vocabulary import strip_special

RESUME_OPTION_SKIP = ("checkpoint", "overwrite")  # not repeated in the printed resume command


def make_optimizer(parameters, lr):
    parameters = [p for p in parameters if p.requires_grad]
    return torch.optim.Adam(parameters, lr=lr) if parameters else None


def scale_learning_rate(optimizer, factor):
    """Multiply every learning rate of an optimizer (the course's adjust_learning_rate)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "target_lr" in group:  # the value a warm-up rises to
            group["target_lr"] *= factor
    print(f"The new learning rate is {optimizer.param_groups[0]['lr']:.6g}")


def default_workers(cfg):
    return cfg["workers"] if cfg["workers"] is not None else min(4, os.cpu_count() or 1)


class WithImageIndex(torch.utils.data.Dataset):
    """A dataset whose items end with their own index (SCST looks up each image's references by it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], index)


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


class Trainer:
    """Holds the state of one training run; `run()` trains epoch by epoch, as train(cfg) does."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.ranks = Ranks.from_environment(cfg["device"])
        with self.ranks.failures_named(), self.ranks.quiet_unless_main():
            self.ranks.check_same_cfg(cfg)
            self.start(cfg)

    def start(self, cfg):
        """The checks of the cfg, the data and the checkpoint to resume; the run's lock; then set_up."""
        self.device = self.ranks.device  # cuda:LOCAL_RANK for a rank of a multi-GPU run
        self.cuda = self.device.type == "cuda"
        check_data_files(cfg["data_folder"], cfg["data_name"], ("TRAIN", "VAL"))
        self.word_map = load_word_map(cfg["data_folder"], cfg["data_name"])
        if cfg["training"] == "scst" and not cfg["checkpoint"]:
            raise ToolkitError("SCST is the second stage: it starts from a model trained with cross-entropy; pass its "
                               "checkpoint (cfg['checkpoint'], --checkpoint BEST_checkpoint_<run>.pth.tar)")
        resume = self.load_resume() if cfg["checkpoint"] else None
        self.from_weights = resume is not None and resume["cfg"]["training"] != cfg["training"]
        if self.from_weights:
            resume = self.start_from_weights(resume)
        cfg["run_name"] = self.resolve_run_name(resume)
        self.paths = RunPaths(cfg["run_name"], cfg["output_folder"])
        check_writable_folder(cfg["output_folder"], "cfg['output_folder'] (--output-folder)")
        self.lock = RunLock(self.paths.lock)
        if self.ranks.is_main:  # the other ranks' pids may live on other machines
            self.lock.acquire()
        try:
            self.set_up(resume)
        except BaseException:
            self.lock.release()
            raise

    def set_up(self, resume):
        """Models, optimisers and data of the run, once the checks passed and the lock is held."""
        cfg = self.cfg
        if resume is None or self.from_weights:
            self.refuse_to_overwrite()
        else:
            self.refuse_to_rewind(resume)
            self.repair_best(resume)
        if self.ranks.is_main:
            for folder in {cfg["output_folder"], cfg["cache_folder"] or cfg["data_folder"]}:
                remove_stale_temp_files(folder)
        self.ranks.barrier()  # no rank writes a temporary file before the stale ones are gone
        torch.manual_seed(cfg["seed"])
        self.encoder = build_encoder(cfg, weights=None if resume else cfg["encoder_weights"])
        self.decoder = build_decoder(cfg, len(self.word_map), self.encoder.encoder_dim)
        self.mixed_precision = self.cuda if cfg["mixed_precision"] is None else cfg["mixed_precision"] and self.cuda
        self.channels_last = self.cuda if cfg["channels_last"] is None else cfg["channels_last"] and self.cuda
        self.amp_dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mixed_precision and self.amp_dtype == torch.float16)
        self.state = {"epoch": cfg["start_epoch"] - 1, "best_bleu4": float(cfg["best_bleu4"]),
                      "best_score": float(cfg["best_bleu4"]) if cfg["val_metric"] == "bleu4" else 0.0,
                      "epochs_since_improvement": cfg["epochs_since_improvement"], "history": empty_history(),
                      "reference_loss": None, "step": 0}
        if resume is not None:
            self.encoder.load_state_dict(resume["encoder_state"])
            self.decoder.load_state_dict(resume["decoder_state"])
        self.encoder.fine_tune(cfg["fine_tune_encoder"])
        self.encoder.to(self.device)
        self.decoder.to(self.device)
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        # Optimisers after the move: their state must live on the parameters' device.
        self.decoder_optimizer = make_optimizer(self.decoder.parameters(), cfg[self.decoder_lr_key])
        self.encoder_optimizer = (make_optimizer(self.encoder.parameters(), cfg["encoder_lr"])
                                  if cfg["fine_tune_encoder"] else None)
        if resume is not None and not self.from_weights:
            self.restore(resume)
        self.check_space_for_checkpoints()
        self.stage = STAGES[cfg["training"]](self)
        self.image_size = None
        self.make_loaders()
        if cfg["channels_last"] is None and not self.uses_cache and not cfg["deterministic"]:  # encoder in the loop
            self.channels_last = training_layout(self.encoder, self.image_size,
                                                 self.train_loader.batch_size) == torch.channels_last
        self.decoder = self.ranks.wrap(self.decoder)
        if cfg["fine_tune_encoder"]:
            self.encoder = self.ranks.wrap(self.encoder)
        self.val_cider = None  # CIDEr-D over the VAL references, made when first needed
        self.log = RunLog(cfg["output_folder"], self.paths.name, only_writer=self.ranks.is_main)

    @property
    def decoder_lr_key(self):
        """The cfg key of the decoder's learning rate in this stage."""
        return "scst_lr" if self.cfg["training"] == "scst" else "decoder_lr"

    @property
    def decoder_module(self):
        """The decoder itself, not its DDP wrapper (what it declares: has_attention, attention_regularization,
        ...; its start/one_step for decoding; its state_dict)."""
        return unwrapped(self.decoder)

    @property
    def encoder_module(self):
        """The encoder itself, not its DDP wrapper."""
        return unwrapped(self.encoder)

    # ------------------------------------------------------------ checks before any work

    def load_resume(self):
        """The checkpoint to resume from, checked against the cfg (model keys, word map, what resuming needs)."""
        path = self.cfg["checkpoint"]
        checkpoint = load_checkpoint(path)
        check_resume_keys(checkpoint, path)
        checkpoint["cfg"] = upgrade_cfg(checkpoint["cfg"], path)
        saved = checkpoint["cfg"]
        for key in MODEL_KEYS:
            if saved[key] != self.cfg[key]:
                raise ToolkitError(f"cfg[{key!r}] = {self.cfg[key]!r} but checkpoint {path!r} was "
                                   f"trained with {saved[key]!r}; use the checkpoint's value to resume")
        if checkpoint["word_map"] != self.word_map:
            raise ToolkitError(word_map_mismatch(path, self.cfg["data_folder"], self.cfg["data_name"]))
        if checkpoint.get("encoder_optimizer") is not None and not self.cfg["fine_tune_encoder"]:
            print("note: the checkpoint fine-tunes its encoder, so fine-tuning goes on (fine_tune_encoder = True)")
            self.cfg["fine_tune_encoder"] = True
        if saved["training"] == self.cfg["training"] and checkpoint["epoch"] + 1 >= self.cfg["epochs"]:
            raise ToolkitError(f"checkpoint {path!r} has trained epochs 0 to {checkpoint['epoch']} and cfg['epochs'] "
                               f"= {self.cfg['epochs']}: nothing is left to train; raise epochs (--epochs) to "
                               f"train on")
        return checkpoint

    def start_from_weights(self, checkpoint):
        """The next stage starts a new run from another stage's weights (SCST from XE): only the weights are
        taken; the earlier run's checkpoints are never written to."""
        if checkpoint["cfg"]["training"] != "xe" or self.cfg["training"] != "scst":
            raise ToolkitError(f"checkpoint {self.cfg['checkpoint']!r} was trained with training = "
                               f"{checkpoint['cfg']['training']!r}; it can resume a {checkpoint['cfg']['training']!r} "
                               f"run or start an 'scst' run from an 'xe' one, not a {self.cfg['training']!r} run")
        print(f"Starting the SCST stage from the weights of {self.cfg['checkpoint']!r} (epoch {checkpoint['epoch']} "
              f"of its cross-entropy run, which is left as it is)")
        return checkpoint

    def resolve_run_name(self, resume):
        """cfg['run_name']; else a resumed run's own name; else <data>_<decoder>_<encoder>[_finetune], with
        _scst after the name of the cross-entropy run an SCST run starts from."""
        if self.cfg["run_name"]:
            return self.cfg["run_name"]
        if resume is None:
            return run_name(self.cfg)
        saved = resume["cfg"]
        name = saved["run_name"] or run_name(dict(saved, fine_tune_encoder=self.cfg["fine_tune_encoder"]))
        return f"{name}_scst" if self.from_weights else name

    def refuse_to_overwrite(self):
        """A fresh run must not silently replace the checkpoints of an earlier run of the same name."""
        existing = [path for path in (self.paths.best, self.paths.last) if os.path.exists(path)]
        if existing and not self.cfg["overwrite"]:
            raise ToolkitError(
                f"{existing[0]!r} already holds a run named {self.paths.name!r}; resume it with "
                f"cfg['checkpoint'] = {self.paths.last!r} (--checkpoint), give this run another "
                f"cfg['run_name'] (--run-name), or set cfg['overwrite'] = True (--overwrite) to replace it")

    def refuse_to_rewind(self, resume):
        """Resuming from an older checkpoint (e.g. BEST) would overwrite the run's newer last checkpoint."""
        last = self.paths.last
        if not os.path.isfile(last) or os.path.abspath(last) == os.path.abspath(self.cfg["checkpoint"]):
            return
        last_epoch = load_checkpoint(last).get("epoch", -1)
        if last_epoch > resume["epoch"] and not self.cfg["overwrite"]:
            raise ToolkitError(
                f"{last!r} holds epoch {last_epoch}, newer than epoch {resume['epoch']} of "
                f"{self.cfg['checkpoint']!r}; resuming from the older one would overwrite it. Resume from "
                f"{last!r}, continue under another cfg['run_name'] (--run-name), or set cfg['overwrite'] = True "
                f"(--overwrite) to train on from epoch {resume['epoch']}")

    def repair_best(self, resume):
        """When the resumed checkpoint's own epoch is the best of its history but BEST holds another epoch (a kill
        while BEST was written by an earlier version, which wrote it after the last checkpoint), rewrite BEST."""
        scores = resume["history"].get(f"val_{self.cfg['val_metric']}", [])
        if not scores or resume["history"]["epoch"][scores.index(max(scores))] != resume["epoch"]:
            return
        best = self.paths.best
        best_epoch = load_checkpoint(best).get("epoch") if os.path.isfile(best) else None
        if best_epoch != resume["epoch"] and self.ranks.is_main:
            print(f"note: {best!r} holds epoch {best_epoch}, but the best epoch of the history is {resume['epoch']}: "
                  f"rewriting it from {self.cfg['checkpoint']!r}")
            save_checkpoint({key: value for key, value in resume.items() if key not in ("format", "format_version")},
                            best)

    def check_space_for_checkpoints(self):
        """The last and best checkpoints must fit on the output disk (each is written beside the old one)."""
        state = {"encoder": self.encoder_module.state_dict(), "decoder": self.decoder_module.state_dict()}
        optimizer_factor = 3  # the weights plus Adam's two moments of every trained parameter
        needed = checkpoint_bytes(state) * optimizer_factor * 2
        check_free_space(self.cfg["output_folder"], needed, "the last and best checkpoints",
                         fix="free some space or point cfg['output_folder'] (--output-folder) at a larger disk")

    def restore(self, checkpoint):
        """Continue from a checkpoint: optimiser states, counters and history (weights are loaded already)."""
        if checkpoint["decoder_optimizer"] is None:
            print("note: the checkpoint holds no optimiser state (an imported model): the optimisers start afresh")
        else:
            self.decoder_optimizer.load_state_dict(checkpoint["decoder_optimizer"])
            self.apply_new_rate(self.decoder_optimizer, self.decoder_lr_key, checkpoint["cfg"])
        if checkpoint.get("encoder_optimizer") is not None:
            self.encoder_optimizer.load_state_dict(checkpoint["encoder_optimizer"])
            self.apply_new_rate(self.encoder_optimizer, "encoder_lr", checkpoint["cfg"])
        self.state.update({key: checkpoint[key] for key in ("epoch", "epochs_since_improvement", "history")})
        self.state["best_bleu4"] = checkpoint.get("best_bleu4", 0.0)
        self.state["best_score"] = checkpoint.get("best_score", self.state["best_bleu4"])  # format 1: BLEU-4
        self.state["reference_loss"] = checkpoint.get("reference_loss")
        self.state["step"] = checkpoint.get("step", 0)
        print(f"Resuming from {self.cfg['checkpoint']!r} after epoch {checkpoint['epoch']}")

    def apply_new_rate(self, optimizer, key, saved_cfg):
        """A resumed run with another cfg learning rate takes it, keeping the decays applied so far."""
        old, new = saved_cfg[key], self.cfg[key]
        if old == new:
            return
        for group in optimizer.param_groups:
            group["lr"] *= new / old
            if "target_lr" in group:  # the value a warm-up rises to
                group["target_lr"] *= new / old
        print(f"note: cfg['{key}'] changed from {old:g} to {new:g} since the checkpoint: the learning rate is now "
              f"{optimizer.param_groups[0]['lr']:.6g} (decays so far kept)")

    # ------------------------------------------------------------ data

    @property
    def uses_cache(self):
        cfg = self.cfg
        return cfg["group_captions"] and cfg["feature_cache"] and not cfg["fine_tune_encoder"]

    def make_loaders(self):
        """Train and val DataLoaders: grouped images (or cached features) with all their captions,
        or the course's one caption per item."""
        cfg = self.cfg
        workers = default_workers(cfg)
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
        # Each rank reads every world_size-th item of the epoch's permutation, drawn from seed * 100_003 + epoch
        # (set_epoch): one process reads the same permutation as RandomSampler with that seed, and the order of
        # an epoch is the same whether the process started with it (a resume) or not. The loader's generator
        # (which draws the workers' seeds when they start) is another.
        sampler = torch.utils.data.distributed.DistributedSampler(
            train, num_replicas=self.ranks.world_size, rank=self.ranks.rank, shuffle=True, seed=cfg["seed"] * 100_003)
        # BatchNorm cannot train on a last batch of one image (every rank has as many items: the same choice).
        drop_last = len(sampler) % batch == 1
        self.val_dataset = val
        # Validation: each rank its share of the val items, none twice (their metrics are gathered).
        self.val_indices = shard_indices(len(val), self.ranks.rank, self.ranks.world_size)
        if self.ranks.distributed:
            val = torch.utils.data.Subset(val, self.val_indices)
        if getattr(self.stage, "needs_image_index", False):
            train = WithImageIndex(train)
        worker_seeds = torch.Generator().manual_seed(cfg["seed"])
        self.train_loader = torch.utils.data.DataLoader(train, batch_size=batch, sampler=sampler, drop_last=drop_last,
                                                        generator=worker_seeds, **options)
        self.val_loader = torch.utils.data.DataLoader(val, batch_size=batch, **options)

    def feature_file(self, split, workers):
        cfg = self.cfg
        self.encoder.eval()
        if not self.ranks.distributed:
            return ensure_feature_cache(self.encoder, cfg["data_folder"], cfg["data_name"], split,
                                        cfg["cache_folder"], batch_size=max(1, cfg["batch_size"]), workers=workers,
                                        device=self.device)
        return self.shared_feature_file(split, workers)

    def shared_feature_file(self, split, workers):
        """The feature cache of a split built by all ranks together: each encodes a contiguous slice into a
        part file of its own, then rank 0 joins them into the cache atomically while the others wait; no
        rank reads it before it is complete."""
        cfg, ranks = self.cfg, self.ranks
        data_folder, data_name = cfg["data_folder"], cfg["data_name"]
        path = feature_cache_path(cfg["cache_folder"] or data_folder, data_name, split, self.encoder.backbone_name)
        fingerprint = encoder_fingerprint(self.encoder, data_paths(data_folder, data_name, split)["images"],
                                          data_folder, data_name)
        if ranks.from_main(lambda: cache_problem(path, fingerprint) is None):
            return path
        parts = [f"{path}.part{rank}of{ranks.world_size}" for rank in range(ranks.world_size)]
        start, end = contiguous_slice(len(ImageCaptionsDataset(data_folder, data_name, split)), ranks.rank,
                                      ranks.world_size)
        build_feature_cache(self.encoder, data_folder, data_name, split, parts[ranks.rank], fingerprint,
                            max(1, cfg["batch_size"]), workers, self.device, indices=range(start, end))
        ranks.barrier()
        if ranks.is_main:
            join_feature_parts(parts, path, fingerprint, self.encoder.backbone_name)
        ranks.barrier()
        return path

    # ------------------------------------------------------------ one batch

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

    def step(self, loss):
        """Backward pass, gradient clipping and one step of every optimiser."""
        optimizers = [o for o in (self.decoder_optimizer, self.encoder_optimizer) if o is not None]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if getattr(self.stage, "decodes_unwrapped", False):  # DDP's forward did not run: no all-reduce yet
            self.ranks.average_gradients(self.decoder_module)
        if self.cfg["grad_clip"] is not None:
            for optimizer in optimizers:
                self.scaler.unscale_(optimizer)
                for group in optimizer.param_groups:
                    torch.nn.utils.clip_grad_value_(group["params"], self.cfg["grad_clip"])
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def train_step(self, batch, where="this batch"):
        """The stage's loss of one batch, checked, then one optimiser step; returns its statistics."""
        loss, stats = self.stage.loss(batch)
        check_finite(loss.item(), f"the training loss at {where}", self.paths.last)
        self.warm_up()
        self.step(loss * self.ranks.loss_weight(stats["loss"][1]))
        self.state["step"] += 1
        self.log.step(self.state["step"], {f"train/{key}": value for key, (value, _) in stats.items()})
        return stats

    def warm_up(self):
        """During the first cfg['lr_warmup_steps'] steps the learning rates rise linearly to their values."""
        steps, step = self.cfg["lr_warmup_steps"], self.state["step"]
        if step >= steps:
            return
        for optimizer in (self.decoder_optimizer, self.encoder_optimizer):
            for group in optimizer.param_groups if optimizer is not None else ():
                group.setdefault("target_lr", group["lr"])
                group["lr"] = group["target_lr"] * min(1.0, (step + 1) / steps)

    # ------------------------------------------------------------ epochs

    def train_epoch(self, epoch):
        """One epoch of the stage's training step; returns the averages of its statistics."""
        cfg = self.cfg
        self.decoder.train()
        self.encoder.train(cfg["fine_tune_encoder"])  # a frozen encoder keeps its BatchNorm statistics
        averages = {}
        self.train_loader.sampler.set_epoch(epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch} train", unit="batch", disable=not self.ranks.is_main)
        for i, batch in enumerate(bar):
            stats = self.train_step(batch, f"epoch {epoch}, batch {i}")
            for key, (value, count) in stats.items():
                averages.setdefault(key, Average()).update(value, count)
            bar.set_postfix({key: f"{average.avg:.3f}" for key, average in averages.items()}, refresh=False)
            if cfg["print_freq"] and (i + 1) % cfg["print_freq"] == 0:
                shown = "\t".join(f"{key} {average.avg:.4f}" for key, average in averages.items())
                bar.write(f"Epoch: [{epoch}][{i + 1}/{len(self.train_loader)}]\t{shown}")
        return {key: average.avg for key, average in self.summed_over_ranks(averages).items()}

    def summed_over_ranks(self, averages):
        """{key: Average} of this rank -> {key: Average} over the items of every rank."""
        keys = sorted(averages)
        totals = self.ranks.sum(*[averages[key].sum for key in keys], *[averages[key].count for key in keys])
        merged = {}
        for key, total, count in zip(keys, totals, totals[len(keys):]):
            merged[key] = Average()
            merged[key].update(total / max(count, 1), count)
        return merged

    @torch.no_grad()
    def validate(self, epoch):
        """Val loss, top-5 accuracy and the course's BLEU-4 of teacher-forced predictions against all the
        captions of each image."""
        self.decoder.eval()
        self.encoder.eval()
        losses, top5 = Average(), Average()
        references, hypotheses = [], []
        for batch in tqdm(self.val_loader, desc=f"epoch {epoch} val", unit="batch", disable=not self.ranks.is_main):
            forced = TeacherForced(self, batch)
            losses.update(forced.loss.item(), forced.targets.numel())
            top5.update(top5_accuracy(forced.packed_scores, forced.targets), forced.targets.numel())
            all_captions = batch[3] if len(batch) == 4 else batch[1]  # (B, cpi, L)
            predictions = forced.scores.argmax(dim=2).tolist()
            for image, prediction, length in zip(forced.image_of_caption().tolist(), predictions,
                                                 forced.decode_lengths):
                references.append([strip_special(c, self.word_map) for c in all_captions[image].tolist()])
                hypotheses.append(strip_special(prediction[:length], self.word_map))
        losses, top5 = self.summed_over_ranks({"loss": losses, "top5": top5}).values()
        check_finite(losses.avg, f"the validation loss at epoch {epoch}", self.paths.last,
                     fix="check the VAL images or features for inf/NaN values (delete a damaged feature cache)")
        shares = self.ranks.gather((references, hypotheses))  # BLEU-4 is a corpus score: once, over every image
        bleu4 = self.ranks.from_main(lambda: course_bleu(*[sum(lists, []) for lists in zip(*shares)])["bleu4"])
        return {"val_loss": losses.avg, "val_top5": top5.avg, "val_bleu4": bleu4}

    @torch.no_grad()
    def validate_by_decoding(self, epoch):
        """CIDEr-D of the greedy captions of every val image against its references (document frequencies
        of the VAL references, as coco-caption computes them for a test split)."""
        self.decoder.eval()
        self.encoder.eval()
        start, end = self.word_map["<start>"], self.word_map["<end>"]
        captions = []
        for batch in tqdm(self.val_loader, desc=f"epoch {epoch} val greedy", unit="batch",
                          disable=not self.ranks.is_main):
            with self.autocast():
                encoder_out = self.encode(batch[0])  # (B, P, C)
                captions += greedy_captions(self.decoder_module, encoder_out, start, end,
                                            self.cfg["max_steps"]).captions(end)
        shares = self.ranks.gather(list(zip(self.val_indices, captions)))
        by_image = dict(pair for share in shares for pair in share)  # val index -> caption
        return self.ranks.from_main(lambda: self.cider_of(by_image))

    def cider_of(self, captions_by_image):
        """Mean CIDEr-D of {val index: caption} over every val image."""
        if self.val_cider is None:
            cfg = self.cfg
            self.val_cider = CiderD(encoded_references(cfg["data_folder"], cfg["data_name"], "VAL", self.word_map),
                                    vocab_size=len(self.word_map))
        images = sorted(captions_by_image)
        return float(self.val_cider.scores([captions_by_image[i] for i in images], images).mean())

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
        """Train, then release the run's lock; on Ctrl-C or SIGTERM say how to resume."""
        try:
            with self.ranks.failures_named(), self.ranks.quiet_unless_main(), self.backend_settings():
                result = self.run_epochs()
            self.ranks.close()
            return result
        except KeyboardInterrupt:
            with self.ranks.quiet_unless_main():
                self.print_resume_command()
            raise
        finally:
            self.lock.release()  # first: a second signal (torchrun's SIGTERM after a failure) may cut this short
            self.log.close()
            self.release_loaders()

    def release_loaders(self):
        """Stop the loaders' persistent worker processes now. Left to the garbage collector (the trainer is in
        reference cycles), their shutdown signal is lost and each worker costs its 5-second timeout."""
        self.train_loader = self.val_loader = None

    def run_epochs(self):
        cfg, state = self.cfg, self.state
        metric = f"val_{cfg['val_metric']}"
        for epoch in range(state["epoch"] + 1, cfg["epochs"]):
            if state["epochs_since_improvement"] >= cfg["early_stop_patience"]:
                print(f"No improvement for {state['epochs_since_improvement']} epochs: early stop")
                break
            if state["epochs_since_improvement"] > 0 and state["epochs_since_improvement"] % cfg["lr_decay_patience"] == 0:
                scale_learning_rate(self.decoder_optimizer, cfg["lr_decay_factor"])
                scale_learning_rate(self.encoder_optimizer, cfg["lr_decay_factor"])
            torch.manual_seed(cfg["seed"] * 100_003 + epoch)  # dropout: the same whether resumed or not
            started = time.time()
            train_stats = self.train_epoch(epoch)
            val_stats = self.validate(epoch)
            if cfg["val_metric"] == "cider":
                val_stats["val_cider"] = self.validate_by_decoding(epoch)
            print_epoch(train_stats, val_stats)
            score = val_stats[metric]
            first = not state["history"]["epoch"]  # the first epoch of a run is its best so far
            is_best = score > state["best_score"] or (first and score >= state["best_score"])
            state["best_score"] = max(score, state["best_score"])
            state["best_bleu4"] = max(val_stats["val_bleu4"], state["best_bleu4"])
            state["epochs_since_improvement"] = 0 if is_best else state["epochs_since_improvement"] + 1
            state["epoch"] = epoch
            record = {"epoch": epoch, **{f"train_{key}": value for key, value in train_stats.items()}, **val_stats,
                      "lr": self.decoder_optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
            for key, value in record.items():
                state["history"].setdefault(key, []).append(value)
            self.save(is_best)
            self.log.epoch(state["history"])
        return {"best_checkpoint": self.paths.best, "last_checkpoint": self.paths.last, "history": state["history"],
                "best_bleu4": state["best_bleu4"], "val_metric": cfg["val_metric"], "best_score": state["best_score"]}

    def save(self, is_best):
        """BEST first (when this epoch is best), then the last checkpoint: whichever a kill interrupts, the
        last checkpoint on disk never records a best epoch that BEST does not hold. Rank 0 alone writes."""
        if not self.ranks.is_main:
            return
        cfg = dict(self.cfg, checkpoint=None)
        checkpoint = {"cfg": cfg, "word_map": self.word_map, "image_size": self.image_size,
                      "encoder_state": self.encoder_module.state_dict(),
                      "decoder_state": self.decoder_module.state_dict(),
                      "encoder_optimizer": None if self.encoder_optimizer is None else self.encoder_optimizer.state_dict(),
                      "decoder_optimizer": self.decoder_optimizer.state_dict(), **self.state}
        if is_best:
            save_checkpoint(checkpoint, self.paths.best)
        save_checkpoint(checkpoint, self.paths.last)

    def print_resume_command(self):
        """After Ctrl-C or SIGTERM: the command that resumes this run from its last checkpoint."""
        if not os.path.isfile(self.paths.last):
            print("\nStopped before the first epoch ended: no checkpoint was written; run the same command to "
                  "start again.")
            return
        defaults = default_cfg()
        options = [f"--{key.replace('_', '-')} {shlex.quote(str(value))}" if not isinstance(value, bool)
                   else f"--{'' if value else 'no-'}{key.replace('_', '-')}"
                   for key, value in self.cfg.items()
                   if key in CFG_SCHEMA and key not in RESUME_OPTION_SKIP and value != defaults[key]
                   and key not in ("attention", "device")]
        print(f"\nStopped. To resume after epoch {load_checkpoint(self.paths.last)['epoch']}:\n"
              f"  python solver.py train {' '.join(options)} --checkpoint {shlex.quote(self.paths.last)}")


def print_epoch(train_stats, val_stats):
    """The course's line after each epoch, plus the stage's and the decoding metrics when there are some."""
    line = (f"\n * LOSS - {val_stats['val_loss']:.3f}, TOP-5 ACCURACY - {val_stats['val_top5']:.3f}, "
            f"BLEU-4 - {val_stats['val_bleu4']:.4f}")
    if "val_cider" in val_stats:
        line += f", CIDEr-D (greedy) - {val_stats['val_cider']:.4f}"
    if "reward" in train_stats:
        line += f"\n * MEAN REWARD - {train_stats['reward']:.4f}, MEAN BASELINE - {train_stats['baseline']:.4f}"
    print(line + "\n")


def check_finite(value, what, last_checkpoint, fix="lower decoder_lr/encoder_lr, set grad_clip, or turn "
                                                   "mixed_precision off"):
    if not math.isfinite(value):
        raise ToolkitError(f"{what} became {value}; training stopped and the last good checkpoint "
                           f"{last_checkpoint!r} (if any) is untouched. {fix[0].upper()}{fix[1:]}")


def word_map_mismatch(checkpoint_path, data_folder, data_name):
    return (f"the word map of checkpoint {checkpoint_path!r} differs from WORDMAP_{data_name}.json in "
            f"{data_folder!r}; the checkpoint was trained on other data: use the data folder it was trained on")
