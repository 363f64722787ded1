"""The training loop: epochs of a training stage, validation, checkpoints, early stopping, learning rates.

`Trainer(cfg).run()` is what `solver.train(cfg)` does. Before the first epoch, run_start.py decides where the
run starts (what it resumes, its name, what it may not overwrite) and takes its lock, the feature caches are
built (features.py), and every check that could fail late passes. Each epoch writes `BEST_checkpoint_<run>`
(when the val metric improved) and then `checkpoint_<run>`, so a kill at any moment loses at most the epoch in
progress, and the last checkpoint never names a best epoch whose weights are not in BEST.

Started by torchrun (distributed.py), every process trains one shard of each epoch with the decoder (and a
fine-tuned encoder) in DistributedDataParallel; rank 0 alone writes files and prints. `self.decoder` and
`self.encoder` are then the DDP wrappers (their forward all-reduces gradients in backward), and
`decoder_module`/`encoder_module` the plain modules (decoding, state_dicts). A stage that decodes through the
plain decoder (SCST; XE with scheduled sampling) has its gradients all-reduced by hand after backward
(Ranks.average_gradients).
"""
import contextlib
import math
import os
import time

import torch
from tqdm.auto import tqdm

from averages import Average, StepSums
from checkpoints import checkpoint_bytes, empty_history, save_checkpoint
from cider import CiderD
from cuda_graphs import training_graphs
from datasets import check_data_files, load_word_map
from distributed import Ranks, unwrapped
from features import prepare_feature_caches
from images import normalize_images
from loaders import TrainingData, default_workers
from metrics import course_bleu
from models import build_decoder, build_encoder
from optimization import Optimizers
from run_log import RunLog
from run_start import resolve_start, resume_command
from sampling import greedy_captions
from training_stages import (STAGES, Batch, TeacherForced, encoded_references, make_stage,
                             scheduled_sampling_probability, top5_accuracy)
from utils import ToolkitError, check_free_space, remove_stale_temp_files
from vocabulary import strip_special

DIVERGENCE_FACTOR = 10.0  # a cross-entropy this many times its first value means training diverged


class Trainer:
    """One training run; `run()` trains it epoch by epoch, as train(cfg) does."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.ranks = Ranks.from_environment(cfg["device"])
        with self.ranks.failures_named(), self.ranks.quiet_unless_main():
            self.ranks.check_same_cfg(cfg)
            check_data_files(cfg["data_folder"], cfg["data_name"], ("TRAIN", "VAL"))
            self.word_map = load_word_map(cfg["data_folder"], cfg["data_name"])
            start = resolve_start(cfg, self.word_map, self.ranks.is_main)
            cfg["run_name"], cfg["fine_tune_encoder"] = start.run_name, start.fine_tune_encoder
            self.paths, self.lock = start.paths, start.lock
            try:
                self.set_up(start)
            except BaseException:
                self.lock.release()
                raise

    def set_up(self, start):
        """Models, optimisers, feature caches and loaders of the run, once its start is resolved."""
        cfg, ranks = self.cfg, self.ranks
        if ranks.is_main:
            for folder in {cfg["output_folder"], cfg["cache_folder"] or cfg["data_folder"]}:
                remove_stale_temp_files(folder)
        ranks.barrier()  # no rank writes a temporary file before the stale ones are gone
        self.device = ranks.device  # cuda:LOCAL_RANK for a rank of a multi-GPU run
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(cfg["seed"])
        checkpoint = start.checkpoint
        self.encoder = build_encoder(cfg, weights=None if checkpoint else cfg["encoder_weights"])
        self.decoder = build_decoder(cfg, len(self.word_map), self.encoder.encoder_dim)
        if checkpoint is not None:
            self.encoder.load_state_dict(checkpoint["encoder_state"])
            self.decoder.load_state_dict(checkpoint["decoder_state"])
        self.encoder.fine_tune(cfg["fine_tune_encoder"])
        self.encoder.to(self.device)
        self.decoder.to(self.device)
        self.mixed_precision = self.cuda if cfg["mixed_precision"] is None else cfg["mixed_precision"] and self.cuda
        self.channels_last = self.cuda if cfg["channels_last"] is None else cfg["channels_last"] and self.cuda
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.amp_dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=self.mixed_precision and self.amp_dtype == torch.float16)
        # After the move: the optimisers' state lives on the parameters' device.
        self.optimizers = Optimizers(self.decoder, self.encoder if cfg["fine_tune_encoder"] else None,
                                     cfg[self.decoder_lr_key], cfg["encoder_lr"], cfg["grad_clip"],
                                     cfg["lr_warmup_steps"], scaler)
        self.state = {"epoch": cfg["start_epoch"] - 1, "best_bleu4": float(cfg["best_bleu4"]),
                      "best_score": float(cfg["best_bleu4"]) if cfg["val_metric"] == "bleu4" else 0.0,
                      "epochs_since_improvement": cfg["epochs_since_improvement"], "history": empty_history(),
                      "reference_loss": None, "step": 0,
                      "scheduled_sampling_prob": scheduled_sampling_probability(cfg, cfg["start_epoch"] - 1)}
        if start.resumes:
            self.restore(checkpoint)
        self.check_space_for_checkpoints()
        workers = default_workers(cfg)
        features = prepare_feature_caches(self.encoder, cfg, ranks, workers) if self.uses_cache else None
        data = TrainingData(cfg, ranks, features, STAGES[cfg["training"]].needs_image_index, pin_memory=self.cuda)
        self.train_loader, self.val_loader, self.val_indices = data.train, data.val, data.val_indices
        self.image_size = data.image_size
        self.decoder.training_graphs = training_graphs(cfg, self.decoder, self.device, ranks.distributed)
        self.decoder = ranks.wrap(self.decoder)
        if cfg["fine_tune_encoder"]:
            self.encoder = ranks.wrap(self.encoder)
        self.stage = make_stage(cfg, self.decoder, self.decoder_module, self.word_map, ranks.tqdm_disabled())
        self.val_cider = None  # CIDEr-D over the VAL references, made when first needed
        self.log = RunLog(cfg["output_folder"], self.paths.name, only_writer=ranks.is_main)

    @property
    def decoder_lr_key(self):
        """The cfg key of the decoder's learning rate in this stage."""
        return "scst_lr" if self.cfg["training"] == "scst" else "decoder_lr"

    @property
    def decoder_module(self):
        """The decoder itself, not its DDP wrapper."""
        return unwrapped(self.decoder)

    @property
    def encoder_module(self):
        """The encoder itself, not its DDP wrapper."""
        return unwrapped(self.encoder)

    @property
    def uses_cache(self):
        cfg = self.cfg
        return cfg["group_captions"] and cfg["feature_cache"] and not cfg["fine_tune_encoder"]

    def restore(self, checkpoint):
        """Continue a checkpoint's run: optimiser states, counters and history (its weights are loaded)."""
        saved = checkpoint["cfg"]
        self.optimizers.restore(checkpoint, {
            "decoder": (self.decoder_lr_key, saved[self.decoder_lr_key], self.cfg[self.decoder_lr_key]),
            "encoder": ("encoder_lr", saved["encoder_lr"], self.cfg["encoder_lr"])})
        self.state.update({key: checkpoint[key] for key in ("epoch", "epochs_since_improvement", "history")})
        self.state["best_bleu4"] = checkpoint.get("best_bleu4", 0.0)
        self.state["best_score"] = checkpoint.get("best_score", self.state["best_bleu4"])  # format 1: BLEU-4
        self.state["reference_loss"] = checkpoint.get("reference_loss")
        self.state["step"] = checkpoint.get("step", 0)
        self.state["scheduled_sampling_prob"] = checkpoint.get(  # the formula's value for older checkpoints
            "scheduled_sampling_prob", scheduled_sampling_probability(self.cfg, checkpoint["epoch"]))
        print(f"Resuming from {self.cfg['checkpoint']!r} after epoch {checkpoint['epoch']}")

    def check_space_for_checkpoints(self):
        """The last and best checkpoints must fit on the output disk (each is written beside the old one)."""
        state = {"encoder": self.encoder_module.state_dict(), "decoder": self.decoder_module.state_dict()}
        optimizer_factor = 3  # the weights plus Adam's two moments of every trained parameter
        check_free_space(self.cfg["output_folder"], checkpoint_bytes(state) * optimizer_factor * 2,
                         "the last and best checkpoints",
                         fix="free some space or point cfg['output_folder'] (--output-folder) at a larger disk")

    # ------------------------------------------------------------ one batch

    def autocast(self):
        # CUDA graphs record the casts of the weights, which autocast's cache would keep out of the graph
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.mixed_precision,
                              cache_enabled=self.decoder_module.training_graphs is None)

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

    def batch(self, loaded, image_index=None):
        """A batch from the loader (inputs, captions, lengths, ...) as the stages take it; the lengths stay on the
        CPU, where the decoders read them."""
        inputs, captions, lengths = loaded[:3]
        return Batch(self.encode(inputs), captions.to(self.device, non_blocking=True), lengths, image_index)

    def train_step(self, loaded):
        """The stage's loss of one batch and one optimiser step; returns the step's statistics, {name: (0-d
        tensor, count)}, unread: nothing here waits for the device."""
        with self.autocast():
            loss, stats = self.stage.loss(self.batch(loaded, loaded[-1] if self.stage.needs_image_index else None))
        after_backward = ((lambda: self.ranks.average_gradients(self.decoder_module))
                          if self.stage.decodes_unwrapped else None)
        self.optimizers.step(loss * self.ranks.loss_weight(stats["loss"][1]), self.state["step"], after_backward)
        self.state["step"] += 1
        return stats

    def read_statistics(self, sums, averages, where):
        """Read the steps' sums into the epoch's averages, after checking them: a non-finite or diverged loss
        stops the run here, before any checkpoint of this epoch is written. Logs their means."""
        totals, highest, first = sums.read()
        if self.stage.checks_divergence:
            self.check_divergence(highest, first)
        check_finite(totals["loss"][0] + highest, f"the training loss at {where}", self.paths.last)
        for key, (total, count) in totals.items():
            averages.setdefault(key, Average()).add(total, count)
        self.log.step(self.state["step"], {f"train/{key}": total / max(count, 1)
                                           for key, (total, count) in totals.items()})

    def check_divergence(self, highest, first):
        """Stop when the cross-entropy explodes far above the first value of the run (a finite divergence, e.g.
        a learning rate far too high): such an epoch must never be saved, let alone marked best."""
        if self.state["reference_loss"] is None:
            self.state["reference_loss"] = first
        reference = self.state["reference_loss"]
        if highest > DIVERGENCE_FACTOR * reference and highest > reference + 5:
            raise ToolkitError(
                f"training diverged: the loss is {highest:.4g}, more than {DIVERGENCE_FACTOR:g} times its first "
                f"value {reference:.4g}; stopped before saving this epoch (the last good checkpoint "
                f"{self.paths.last!r}, if any, is untouched). Lower decoder_lr/encoder_lr (now "
                f"{self.cfg['decoder_lr']:g}/{self.cfg['encoder_lr']:g}) or set grad_clip")

    # ------------------------------------------------------------ epochs

    def train_epoch(self, epoch):
        """One epoch of the stage's training step; returns the averages of its statistics."""
        cfg = self.cfg
        self.decoder.train()
        self.encoder.train(cfg["fine_tune_encoder"])  # a frozen encoder keeps its BatchNorm statistics
        averages, sums, first_batch = {}, StepSums(), 0
        self.train_loader.sampler.set_epoch(epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch} train", unit="batch", disable=not self.ranks.is_main)
        for i, loaded in enumerate(bar):
            sums.add(self.train_step(loaded))
            printing = cfg["print_freq"] and (i + 1) % cfg["print_freq"] == 0
            if printing or i + 1 == len(self.train_loader):
                self.read_statistics(sums, averages, f"epoch {epoch}, batches {first_batch} to {i}")
                sums, first_batch = StepSums(), i + 1
                bar.set_postfix({key: f"{average.avg:.3f}" for key, average in averages.items()}, refresh=False)
            if printing:
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
            merged[key].add(total, count)
        return merged

    @torch.no_grad()
    def validate(self, epoch):
        """Val loss, top-5 accuracy and the course's BLEU-4 of teacher-forced predictions against all the
        captions of each image."""
        self.decoder.eval()
        self.encoder.eval()
        losses, top5 = Average(), Average()
        references, hypotheses = [], []
        for loaded in tqdm(self.val_loader, desc=f"epoch {epoch} val", unit="batch", disable=not self.ranks.is_main):
            with self.autocast():
                forced = TeacherForced(self.decoder, self.batch(loaded), self.cfg["alpha_c"],
                                       self.decoder_module.attention_regularization)
            losses.update(forced.loss.item(), forced.targets.numel())
            top5.update(top5_accuracy(forced.packed_scores, forced.targets).item(), forced.targets.numel())
            all_captions = loaded[3] if len(loaded) == 4 else loaded[1]  # (B, cpi, L)
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
        for loaded in tqdm(self.val_loader, desc=f"epoch {epoch} val greedy", unit="batch",
                           disable=not self.ranks.is_main):
            with self.autocast():
                encoder_out = self.encode(loaded[0])  # (B, P, C)
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
                print(resume_command(self.cfg, self.paths.last))
            raise
        finally:
            self.lock.release()  # first: a second signal (torchrun's SIGTERM after a failure) may cut this short
            self.log.close()
            # Stop the loaders' persistent workers now: left to the garbage collector (the trainer is in reference
            # cycles), their shutdown signal is lost and each worker costs its 5-second timeout.
            self.train_loader = self.val_loader = None

    def run_epochs(self):
        cfg, state = self.cfg, self.state
        metric = f"val_{cfg['val_metric']}"
        for epoch in range(state["epoch"] + 1, cfg["epochs"]):
            if state["epochs_since_improvement"] >= cfg["early_stop_patience"]:
                print(f"No improvement for {state['epochs_since_improvement']} epochs: early stop")
                break
            if state["epochs_since_improvement"] > 0 and state["epochs_since_improvement"] % cfg["lr_decay_patience"] == 0:
                self.optimizers.decay(cfg["lr_decay_factor"])
            torch.manual_seed(cfg["seed"] * 100_003 + epoch)  # dropout: the same whether resumed or not
            self.schedule_sampling(epoch)
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
                      "lr": self.optimizers.lr, "seconds": time.time() - started}
            if cfg["scheduled_sampling_start"] >= 0:
                record["scheduled_sampling_prob"] = state["scheduled_sampling_prob"]
            for key, value in record.items():
                state["history"].setdefault(key, []).append(value)
            self.save(is_best)
            self.log.epoch(state["history"])
        return {"best_checkpoint": self.paths.best, "last_checkpoint": self.paths.last, "history": state["history"],
                "best_bleu4": state["best_bleu4"], "val_metric": cfg["val_metric"], "best_score": state["best_score"]}

    def schedule_sampling(self, epoch):
        """Scheduled sampling's p of this epoch, from the formula (a resumed run gets the same), into the state
        and the XE stage."""
        self.state["scheduled_sampling_prob"] = scheduled_sampling_probability(self.cfg, epoch)
        if self.stage.name == "xe":
            self.stage.sampling_probability = self.state["scheduled_sampling_prob"]

    def save(self, is_best):
        """BEST first (when this epoch is best), then the last checkpoint: whichever a kill interrupts, the
        last checkpoint on disk never records a best epoch that BEST does not hold. Rank 0 alone writes."""
        if not self.ranks.is_main:
            return
        checkpoint = {"cfg": dict(self.cfg, checkpoint=None), "word_map": self.word_map, "image_size": self.image_size,
                      "encoder_state": self.encoder_module.state_dict(),
                      "decoder_state": self.decoder_module.state_dict(), **self.optimizers.state_dicts(), **self.state}
        for path in ([self.paths.best] if is_best else []) + [self.paths.last]:
            try:
                save_checkpoint(checkpoint, path)
            except (OSError, ToolkitError) as error:  # ToolkitError: a full disk, which atomic_path words
                raise ToolkitError(self.unsaved_message(path, error)) from None

    def unsaved_message(self, path, error):
        """Why epoch N's checkpoint `path` could not be written, what is intact, and how to go on."""
        epoch, folder = self.state["epoch"], os.path.dirname(os.path.abspath(path))
        why = f"{type(error).__name__}: {error.strerror or error}" if isinstance(error, OSError) else str(error)
        if os.path.isfile(self.paths.last):
            go_on = (f"the last checkpoint written, {self.paths.last!r}, is intact; make {folder!r} writable (or free "
                     f"space) and resume from it (--checkpoint {self.paths.last})")
        else:
            go_on = f"no checkpoint of this run was written; make {folder!r} writable (or free space) and start again"
        return f"epoch {epoch}'s checkpoint could not be written to {path!r}: {why}. Training stopped; {go_on}"


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
