"""Speed of the toolkit's fast paths against the course's code, measured side by side on shapes data.

    python bench.py                  # CPU figures (about 8 minutes on an idle 2 cores); GPU section on CUDA
    python bench.py --quick          # a few seconds per part (small backbone and images): for the tests
    python bench.py --json FILE      # also write every figure as JSON
    python bench.py --backbones      # markdown table of the encoder backbones: C, size, GFLOPs, CPU ms
    python bench.py --ddp            # training in 1 against 2 processes (torchrun, one thread each), all-reduce

The CPU part uses the course's model configuration (ResNet-101 with random weights, 256 x 256 images,
14 x 14 grid, batch 32, embed/attention/decoder 512) and prints one line per figure; the ratios are
`train_speedup_attention`, `train_speedup_rnn`, `beam_speedup` (with `beam_mismatches`), `encoder_speedup`,
`cache_build_speedup` and `preprocess_speedup`, each with the absolute figures behind it. Every timed part runs the toolkit's
own code (training.Trainer.train_step, beam_search, create_input_files) after a warm-up, in
one process, with data loading in that process too (workers=0), so both sides of a ratio pay for it.
"""
import argparse
import contextlib
import copy
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from unittest import mock

import h5py
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import get_model
from tqdm import tqdm

import solver
from beam_search import beam_search, beam_search_one
from captioner import Captioner
from create_input_files import create_input_files
from data_files import base_name
from datasets import ImageCaptionsDataset
from encoding import EncodingPlan, encode_images, encoding_plan
from config import validate_cfg
import features
from backbones import BACKBONES
from images import normalize_images
from models import Encoder
from shapes import IMAGE_FOLDER, JPEG_QUALITY, make_shapes_dataset
from training import Trainer
from utils import atomic_path, run_cli

COCO_TRAIN_IMAGES = 113_287  # Karpathy split: train + restval
COCO_VAL_IMAGES = 5_000
CAPTIONS_PER_IMAGE = 5
BATCH_SIZE = 32  # the course's: captions per batch (grouped: 32 // 5 = 6 images, 30 captions)
BEAM_SIZE = 3
BEAM_BATCH = 50  # images per batched beam_search call, as solver.test's DataLoader batches
DECODERS = ("attention", "rnn")
SEED = 0
BUSY_LOAD = 0.5  # load average per core above which the figures come with a warning
CALIBRATION_IMAGES = 8  # training images whose BatchNorm statistics the random encoder gets


@dataclass(frozen=True)
class Settings:
    """The sizes of one benchmark run."""
    backbone: str
    image_size: int  # side of the images the models see
    grid: int  # side of the encoder's output grid
    dims: int  # embed, attention and decoder dimension
    train_images: int
    val_images: int  # their cached features are the inputs of the beam search comparison
    warmup_steps: int  # training steps before each timed part
    timing_rounds: int  # each round: one timed step of the course's path (encoder in the loop: slow), then
    cached_steps_per_round: int  # this many timed steps of the grouped + cached path
    beam_training_steps: int  # extra steps that teach the decoder the shapes captions before beam search
    beam_rounds: int  # each beam search timing is the fastest of this many runs, the two searches in turn
    preprocess_images: int  # images create_input_files turns into HDF5, per timed run
    source_size: tuple  # (width, height) of the JPEGs create_input_files reads
    preprocess_rounds: int  # timed runs per worker count (the fastest counts)
    scst_steps: int  # timed SCST training steps
    transformer_layers: int  # decoder layers and layers over the grid of the Transformer (COCO: 6 and 6)


FULL = Settings(backbone="resnet101", image_size=256, grid=14, dims=512, train_images=48, val_images=100,
                warmup_steps=1, timing_rounds=2, cached_steps_per_round=5, beam_training_steps=60, beam_rounds=5,
                preprocess_images=1200, source_size=(640, 480), preprocess_rounds=2, scst_steps=8,
                transformer_layers=6)
QUICK = Settings(backbone="resnet18", image_size=64, grid=4, dims=64, train_images=12, val_images=8,
                 warmup_steps=1, timing_rounds=2, cached_steps_per_round=2, beam_training_steps=10, beam_rounds=1,
                 preprocess_images=24, source_size=(160, 120), preprocess_rounds=1, scst_steps=2,
                 transformer_layers=1)


@dataclass(frozen=True)
class BenchData:
    folder: str
    name: str  # data_name of the files create_input_files wrote
    encoder_weights: str  # state_dict file of the encoder's backbone (see calibrated_weights)


# ---------------------------------------------------------------- reporting

def report(name, text):
    print(f"{name}: {text}", flush=True)


def report_ratio(name, ratio):
    print(f"{name}: {ratio:.2f} x", flush=True)


def cpu_model():
    """The CPU's marketing name, from /proc/cpuinfo on Linux."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as file:
        for line in file:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine():
    """What the figures were measured on."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": "cpu", "cuda_device": cuda, "load_average": os.getloadavg()[0]}


def coco_projection(samples_per_second, cache_images_per_second=None):
    """Hours for the training pass of one COCO epoch (113,287 images x 5 captions, no validation) at a
    training rate, and, when the images per second of a feature cache build are given, hours to build
    the TRAIN + VAL cache once (118,287 images)."""
    epoch_hours = COCO_TRAIN_IMAGES * CAPTIONS_PER_IMAGE / samples_per_second / 3600
    cache_hours = None
    if cache_images_per_second is not None:
        cache_hours = (COCO_TRAIN_IMAGES + COCO_VAL_IMAGES) / cache_images_per_second / 3600
    return {"epoch_hours": epoch_hours, "cache_hours": cache_hours}


# ---------------------------------------------------------------- timing

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fastest_alternately(functions, rounds, *args):
    """Call each of `functions` (a dict) with `args`, in turn, `rounds` times over, so that every one sees
    the same load of the machine; returns {name: (result, seconds of its fastest call)}, the call least
    disturbed by the rest of the machine."""
    fastest = {}
    for _ in range(rounds):
        for name, function in functions.items():
            result, seconds = timed(function, *args)
            fastest[name] = (result, min(seconds, fastest.get(name, (None, math.inf))[1]))
    return fastest


def timed(function, *args, device="cpu", **kwargs):
    """(result, seconds) of one call, with the device's queued work finished at both ends."""
    synchronize(device)
    start = time.perf_counter()
    result = function(*args, **kwargs)
    synchronize(device)
    return result, time.perf_counter() - start


def training_steps(trainer):
    """Endless training steps as training.Trainer.train_epoch runs them (Trainer.train_step), epoch after
    epoch; yields (captions in the batch, loss)."""
    trainer.decoder.train()
    trainer.encoder.train(trainer.cfg["fine_tune_encoder"])  # a frozen encoder stays in eval mode
    for epoch in itertools.count():
        trainer.train_loader.sampler.set_epoch(epoch)
        for batch in trainer.train_loader:
            stats = trainer.train_step(batch)
            yield batch[2].numel(), stats["loss"][0]  # lengths: (B, 1) per caption, (B, cpi) grouped


def time_side_by_side(sides, warmup, rounds, device):
    """Time training step generators alternately, round by round, so that every side sees the same load
    of the machine. sides: {name: (steps, steps per round)}; each first runs `warmup` untimed steps.
    Returns {name: (captions, seconds)}; loading each timed batch is inside the timed part."""
    for steps, _ in sides.values():
        for _ in itertools.islice(steps, warmup):
            pass
    totals = {name: (0, 0.0) for name in sides}
    for _ in range(rounds):
        for name, (steps, count) in sides.items():
            captions, seconds = timed(lambda: sum(n for n, _ in itertools.islice(steps, count)), device=device)
            totals[name] = (totals[name][0] + captions, totals[name][1] + seconds)
    return totals


# ---------------------------------------------------------------- data

def make_bench_data(folder, work, settings):
    """Shapes scenes at the model's image size, preprocessed like COCO (5 captions per image), and the
    encoder's weights."""
    json_path = make_shapes_dataset(folder, settings.train_images, settings.val_images, 1, seed=SEED,
                                    image_size=settings.image_size)
    create_input_files("shapes", json_path, os.path.join(folder, IMAGE_FOLDER), CAPTIONS_PER_IMAGE, 0, folder,
                       image_size=settings.image_size, workers=1, overwrite=True)
    name = base_name("shapes", CAPTIONS_PER_IMAGE, 0)
    weights = calibrated_weights(settings.backbone, folder, name, os.path.join(work, f"{settings.backbone}.pth"))
    return BenchData(folder, name, weights)


def calibrated_weights(backbone, data_folder, data_name, path, images=CALIBRATION_IMAGES):
    """Write a state_dict file of the backbone's classifier with random weights, as weights=None gives,
    but BatchNorm running statistics measured on the first training images.

    With the initial statistics (mean 0, variance 1) a frozen, eval-mode random ResNet-101 amplifies its
    activations block after block to ~1e5: the float16 cache overflows to inf and the loss becomes NaN.
    Measured statistics keep the features near unit scale; the cost of a step is the same.
    """
    torch.manual_seed(SEED)
    classifier = get_model(backbone, weights=None)
    for module in classifier.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: the statistics of exactly these images
    dataset = ImageCaptionsDataset(data_folder, data_name, "TRAIN")
    batch = torch.stack([dataset[index][0] for index in range(min(images, len(dataset)))])  # uint8 (N, 3, S, S)
    with torch.no_grad():
        classifier.train()(normalize_images(batch))
    torch.save(classifier.state_dict(), path)
    return path


def make_trainer(data, work, settings, decoder, device="cpu", **overrides):
    """A training.Trainer on the bench data: the course's model configuration, the toolkit's cfg defaults
    (grouped captions, feature cache) unless `overrides` say otherwise."""
    cfg = {"data_folder": data.folder, "data_name": data.name, "decoder": decoder, "encoder": settings.backbone,
           "encoder_weights": data.encoder_weights, "encoded_image_size": settings.grid, "embed_dim": settings.dims,
           "attention_dim": settings.dims, "decoder_dim": settings.dims, "batch_size": BATCH_SIZE, "workers": 0,
           "device": device, "seed": SEED, "print_freq": 0, "output_folder": os.path.join(work, "checkpoints"),
           "cache_folder": os.path.join(work, "cache")}
    return Trainer(validate_cfg(dict(cfg, **overrides)))


@dataclass(frozen=True)
class FeatureCache:
    """The TRAIN and VAL feature caches built (and timed) by the benchmark."""
    paths: tuple
    stamps: tuple  # st_mtime_ns of each file right after the build
    images: int
    seconds: float

    def figures(self):
        return {"images": self.images, "seconds": self.seconds, "images_per_s": self.images / self.seconds}


def build_feature_caches(encoder, data, cache_folder, device):
    """Build the TRAIN and VAL feature caches as train(cfg) does, timed."""
    encoder.eval()
    paths, seconds = timed(lambda: tuple(features.ensure_feature_cache(encoder, data.folder, data.name, split,
                                                                       cache_folder, batch_size=BATCH_SIZE,
                                                                       device=device)
                                         for split in ("TRAIN", "VAL")), device=device)
    images = 0
    for path in paths:
        with h5py.File(path, "r") as h5:
            images += len(h5["features"])
    return FeatureCache(paths, tuple(os.stat(path).st_mtime_ns for path in paths), images, seconds)


def plain_cache_build(encoder, data, cache_folder):
    """The TRAIN and VAL feature caches built the plain way, timed: the default layout and the whole batch a call,
    as before features.build_feature_cache took encoding.cache_plan (the baseline of cache_build_speedup)."""
    def plain_plan(device, batch_size):
        return EncodingPlan(torch.contiguous_format, batch_size)
    with mock.patch.object(features, "cache_plan", plain_plan):
        return build_feature_caches(encoder, data, cache_folder, "cpu")


def check_reads_cache(trainer, cache):
    """A grouped Trainer must read the caches built (and timed) before, not rebuild them."""
    stamps = tuple(os.stat(path).st_mtime_ns for path in cache.paths)
    if trainer.train_loader.dataset.features_file != cache.paths[0] or stamps != cache.stamps:
        raise RuntimeError(f"the Trainer did not reuse the feature caches {cache.paths} built by the benchmark "
                           f"(their fingerprints differ): the cache build time would be counted twice")


def read_cached_features(path):
    """float32 (N, P, C) encodings from a float16 feature cache."""
    with h5py.File(path, "r") as h5:
        return torch.from_numpy(h5["features"][:]).float()


# ---------------------------------------------------------------- CPU sections

def training_section(data, work, settings):
    """Per decoder: course-style vs grouped + cached training, then the beam search comparison on a
    decoder trained a little further. Returns the figures and the best checkpoint of the trained attention
    decoder (what encoder_section tests)."""
    figures = {"train": {}, "beam": {}}
    cache = None
    for decoder_name in DECODERS:
        course = make_trainer(data, work, settings, decoder_name, group_captions=False, feature_cache=False)
        if decoder_name == "rnn":
            course.decoder.fused_lstm = False  # the course's step-by-step LSTMCell loop
        if cache is None:  # every Trainer's encoder has the same weights: one cache serves all
            cache = build_feature_caches(course.encoder, data, os.path.join(work, "cache"), "cpu")
            report("feature_cache_build", f"{cache.images} images (TRAIN + VAL) in {cache.seconds:.1f} s "
                                          f"({cache.images / cache.seconds:.2f} images/s), once before training")
        fast = make_trainer(data, work, settings, decoder_name)
        check_reads_cache(fast, cache)
        fast_steps = training_steps(fast)
        totals = time_side_by_side({"course": (training_steps(course), 1),
                                    "cached": (fast_steps, settings.cached_steps_per_round)},
                                   settings.warmup_steps, settings.timing_rounds, "cpu")
        del course
        train = {side: {"captions": captions, "seconds": seconds, "samples_per_s": captions / seconds}
                 for side, (captions, seconds) in totals.items()}
        report_training(decoder_name, train, settings)
        train["speedup"] = train["cached"]["samples_per_s"] / train["course"]["samples_per_s"]
        train["coco_projection"] = {"course": coco_projection(train["course"]["samples_per_s"]),
                                    "cached": coco_projection(train["cached"]["samples_per_s"],
                                                              cache.images / cache.seconds)}
        figures["train"][decoder_name] = train
        figures["beam"][decoder_name] = beam_comparison(fast, fast_steps, read_cached_features(cache.paths[1]),
                                                        settings)
        if decoder_name == "attention":
            figures["scst"] = scst_section(fast, data, work, settings)
            trained_checkpoint = fast.paths.best  # written by scst_section
        del fast, fast_steps
    figures["transformer"] = transformer_section(data, work, settings, cache)
    figures["beam"]["transformer"] = figures["transformer"].pop("beam")
    figures["feature_cache"] = cache.figures()
    report_coco_projection(figures["train"]["attention"]["coco_projection"])
    return figures, trained_checkpoint


def report_training(decoder_name, train, settings):
    course, cached = train["course"], train["cached"]
    report(f"train_course_{decoder_name}", f"{course['samples_per_s']:.2f} samples/s ({course['captions']} "
                                           f"captions in {course['seconds']:.1f} s; per caption, {settings.backbone} "
                                           f"in the loop)")
    report(f"train_cached_{decoder_name}", f"{cached['samples_per_s']:.2f} samples/s ({cached['captions']} "
                                           f"captions in {cached['seconds']:.1f} s; grouped, cached float16 features)")
    report_ratio(f"train_speedup_{decoder_name}", cached["samples_per_s"] / course["samples_per_s"])


def report_coco_projection(projection):
    course, cached = projection["course"], projection["cached"]
    report("coco_epoch_cpu_attention", f"training pass of one COCO epoch (113,287 images x 5 captions) at these "
                                       f"rates: course {course['epoch_hours']:.1f} h, cached "
                                       f"{cached['epoch_hours']:.1f} h (+ {cached['cache_hours']:.1f} h once to "
                                       f"build the TRAIN + VAL cache)")


def beam_comparison(trainer, steps, encoder_out, settings):
    """Train the decoder a little further (so its captions end at varied lengths), then beam search
    the cached VAL encodings one image at a time and batched; returns the figures."""
    name = trainer.cfg["decoder"]
    losses, training_seconds = timed(
        lambda: [loss for _, loss in itertools.islice(steps, settings.beam_training_steps)])
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    report(f"beam_decoder_training_{name}", f"{settings.beam_training_steps} more steps in {training_seconds:.1f} s, "
                                            f"loss {first:.2f} -> {last:.2f}")
    decoder = trainer.decoder.eval()
    start_id, end_id = trainer.word_map["<start>"], trainer.word_map["<end>"]
    search = dict(start_id=start_id, end_id=end_id, beam_size=BEAM_SIZE)
    beam_search_one(decoder, encoder_out[:1], **search)  # warm-up
    beam_search(decoder, encoder_out[:2], **search)
    searches = {"one": lambda chunk: [beam_search_one(decoder, image[None], **search) for image in chunk],
                "batched": lambda chunk: beam_search(decoder, chunk, **search)}
    one, batched, one_seconds, batched_seconds = [], [], 0.0, 0.0
    for chunk in encoder_out.split(BEAM_BATCH):  # side by side, chunk by chunk
        fastest = fastest_alternately(searches, settings.beam_rounds, chunk)
        one, one_seconds = one + fastest["one"][0], one_seconds + fastest["one"][1]
        batched, batched_seconds = batched + fastest["batched"][0], batched_seconds + fastest["batched"][1]
    mismatches = sum(a.words != b.words for a, b in zip(one, batched))
    lengths = [len(caption.words) - 2 for caption in one]  # words between <start> and <end>
    unfinished = sum(caption.words[-1] != end_id for caption in one)
    images = len(encoder_out)
    one_rate, batched_rate = images / one_seconds, images / batched_seconds
    suffix = "" if name == "attention" else f"_{name}"
    report(f"beam_one{suffix}", f"{one_rate:.2f} images/s ({images} images in {one_seconds:.2f} s, beam_search_one, "
                                f"{name} decoder, beam size {BEAM_SIZE})")
    report(f"beam_batched{suffix}", f"{batched_rate:.2f} images/s ({images} images in {batched_seconds:.2f} s, "
                                    f"beam_search in batches of {BEAM_BATCH})")
    report(f"beam_captions{suffix}", f"{min(lengths)} to {max(lengths)} words, mean {statistics.mean(lengths):.1f}, "
                                     f"{unfinished} without <end>, {mismatches} differ")
    report_ratio(f"beam_speedup{suffix}", batched_rate / one_rate)
    return {"training_steps": settings.beam_training_steps, "training_seconds": training_seconds,
            "training_loss": [first, last], "images": images,
            "one": {"seconds": one_seconds, "images_per_s": one_rate},
            "batched": {"seconds": batched_seconds, "images_per_s": batched_rate},
            "speedup": batched_rate / one_rate, "mismatches": mismatches,
            "caption_words": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
            "unfinished": unfinished}


def transformer_section(data, work, settings, cache):
    """The Transformer decoder (self-critical.pytorch's COCO sizes, width = the bench's dims): cached training
    steps per second, batched against one-image beam search, and one cached incremental decoding step
    against recomputing the whole prefix, as a decoder without a key/value cache must."""
    trainer = make_trainer(data, work, settings, "transformer", lr_warmup_steps=0,
                           transformer_layers=settings.transformer_layers,
                           transformer_encoder_layers=settings.transformer_layers)
    check_reads_cache(trainer, cache)
    steps = training_steps(trainer)
    totals = time_side_by_side({"cached": (steps, settings.cached_steps_per_round)}, settings.warmup_steps,
                               settings.timing_rounds, "cpu")
    captions, seconds = totals["cached"]
    report("train_samples_per_s_transformer", f"{captions / seconds:.2f} samples/s ({captions} captions in "
                                              f"{seconds:.1f} s; grouped, cached float16 features)")
    figures = {"train_samples_per_s": captions / seconds,
               "beam": beam_comparison(trainer, steps, read_cached_features(cache.paths[1]), settings)}
    figures["incremental"] = incremental_step_cost(trainer.decoder.eval(), read_cached_features(cache.paths[1]),
                                                   trainer.word_map["<start>"], settings)
    trainer.lock.release()
    return figures


def incremental_step_cost(decoder, encoder_out, start_id, settings, length=16):
    """Seconds to decode `length` words for a batch: one_step with the cached keys and values, against a
    teacher-forced pass over the whole prefix at every step (what a step costs without the cache)."""
    encoder_out = encoder_out[:BEAM_BATCH].reshape(min(BEAM_BATCH, len(encoder_out)), -1, encoder_out.size(-1))
    words = torch.full((len(encoder_out), length + 1), start_id, dtype=torch.long)

    def cached(memory, start_state):
        state = start_state
        for t in range(length):
            _, state, _ = decoder.one_step(decoder.embedding(words[:, t]), memory, state)

    def recomputed(memory, start_state):
        for t in range(1, length + 1):
            decoder.decode_teacher_forced(decoder.embedding(words[:, :t]), memory, start_state, [t] * len(words))

    with torch.inference_mode():  # the grid's encoder layers and memory keys (start) are outside the timing
        memory, start_state = decoder.start(encoder_out)
        fastest = fastest_alternately({"cached": cached, "recomputed": recomputed}, settings.beam_rounds, memory,
                                      start_state)
    ratio = fastest["recomputed"][1] / fastest["cached"][1]
    report("transformer_incremental_step", f"{length} steps of {len(words)} captions: {fastest['cached'][1]:.2f} s "
                                           f"with cached keys and values, {fastest['recomputed'][1]:.2f} s "
                                           f"recomputing the prefix ({ratio:.2f} x)")
    return {"steps": length, "captions": len(words), "cached_seconds": fastest["cached"][1],
            "recomputed_seconds": fastest["recomputed"][1], "ratio": ratio}


def scst_section(xe_trainer, data, work, settings):
    """The real SCST training step (Trainer.train_step of the scst stage) from the attention decoder trained
    above: sampled captions per second, and the share of the step that computing the CIDEr-D rewards takes."""
    xe_trainer.save(is_best=True)
    trainer = make_trainer(data, work, settings, "attention", training="scst", checkpoint=xe_trainer.paths.best)
    reward = trainer.stage.reward
    real_scores, reward_seconds = reward.scores, [0.0]

    def timed_scores(*args):
        start = time.perf_counter()
        result = real_scores(*args)
        reward_seconds[0] += time.perf_counter() - start
        return result
    reward.scores = timed_scores
    trainer.decoder.train()
    batches = itertools.islice(itertools.cycle(trainer.train_loader), settings.scst_steps + 1)
    trainer.train_step(next(batches))  # warm-up
    reward_seconds[0], samples, start = 0.0, 0, time.perf_counter()
    for batch in batches:
        trainer.train_step(batch)
        samples += len(batch[0]) * trainer.cfg["scst_samples"]
    seconds = time.perf_counter() - start
    share = reward_seconds[0] / seconds
    report("scst_samples_per_s", f"{samples / seconds:.2f} sampled captions/s ({samples} in {seconds:.1f} s, "
                                 f"{trainer.cfg['scst_samples']} per image, mean baseline, attention decoder)")
    report("cider_reward_share", f"{share:.4f} of the SCST step ({reward_seconds[0] * 1000:.1f} ms of CIDEr-D "
                                 f"rewards in {seconds:.1f} s)")
    trainer.lock.release()
    return {"samples_per_s": samples / seconds, "reward_share": share, "seconds": seconds, "samples": samples}


def write_source_jpegs(folder, settings, images):
    """`images` shapes scenes as JPEGs of source_size (like COCO's ~640 x 480): rendered square at the
    height, then stretched to the width. Returns (Karpathy JSON path, image folder)."""
    val = test = max(1, images // 10)
    width, height = settings.source_size
    json_path = make_shapes_dataset(folder, images - val - test, val, test, seed=SEED + 1, image_size=height)
    image_folder = os.path.join(folder, IMAGE_FOLDER)
    for filename in tqdm(sorted(os.listdir(image_folder)), desc="stretch JPEGs", unit="img"):
        path = os.path.join(image_folder, filename)
        with Image.open(path) as image:
            stretched = image.resize((width, height), Image.Resampling.BICUBIC)
        stretched.save(path, quality=JPEG_QUALITY)
    return json_path, image_folder


def preprocess_section(work, settings):
    """create_input_files with one worker and with all cores, alternately (the fastest of the rounds
    counts), on preprocess_images JPEGs and on 3 JPEGs: the 3-image run's time is the per-call
    start-up (worker pool, JSON and word map) that a long run amortises. Each call runs in a fresh
    Python process, as from the command line: the workers of a call made here would first import
    this script, torch included (multiprocessing's rule for the main module), which no user pays."""
    sources = {count: write_source_jpegs(os.path.join(work, f"preprocess_source_{count}"), settings, count)
               for count in (settings.preprocess_images, 3)}
    output = os.path.join(work, "preprocess_output")

    def run(images, workers):
        json_path, image_folder = sources[images]
        return seconds_in_fresh_process(json_path, image_folder, output, settings.image_size, workers)

    cores = os.cpu_count()
    run(3, cores)  # warm-up: fills the page cache
    seconds = {(images, workers): [] for images in sources for workers in (1, cores)}
    for _ in range(settings.preprocess_rounds):
        for images, workers in seconds:
            seconds[images, workers].append(run(images, workers))
    best = {key: min(values) for key, values in seconds.items()}
    images, width, height = settings.preprocess_images, *settings.source_size
    one, every = best[images, 1], best[images, cores]
    startup_one, startup_every = best[3, 1], best[3, cores]
    report("preprocess_one_worker", f"{images / one:.1f} images/s ({images} JPEGs of {width} x {height} to "
                                    f"{settings.image_size} x {settings.image_size} in {one:.2f} s)")
    report("preprocess_all_workers", f"{images / every:.1f} images/s ({cores} workers, {every:.2f} s)")
    report_ratio("preprocess_speedup", one / every)
    report("preprocess_startup", f"{startup_every:.2f} s per call with {cores} workers, {startup_one:.2f} s with one "
                                 f"(create_input_files on 3 images)")
    steady_one = steady_rate(images - 3, one - startup_one)
    steady_every = steady_rate(images - 3, every - startup_every)
    steady_speedup = steady_every / steady_one if steady_one and steady_every else None
    if steady_speedup is None:
        report("preprocess_steady", "not measurable: the start-up is as long as the whole run")
    else:
        report("preprocess_steady", f"{steady_one:.1f} images/s with one worker, {steady_every:.1f} with {cores} "
                                    f"(start-up subtracted, as in a long run): {steady_speedup:.2f} x")
    return {"images": images, "source_size": [width, height], "workers": cores,
            "seconds": {f"{count}_images_{workers}_workers": values for (count, workers), values in seconds.items()},
            "images_per_s_one_worker": images / one, "images_per_s_all_workers": images / every,
            "speedup": one / every, "startup_seconds_one_worker": startup_one,
            "startup_seconds_all_workers": startup_every, "steady_images_per_s_one_worker": steady_one,
            "steady_images_per_s_all_workers": steady_every, "steady_speedup": steady_speedup}


def seconds_in_fresh_process(json_path, image_folder, output_folder, image_size, workers):
    """Seconds one create_input_files call takes in a new Python process (interpreter start-up excluded)."""
    code = ("import time; from create_input_files import create_input_files; start = time.perf_counter(); "
            f"create_input_files('shapes', {json_path!r}, {image_folder!r}, {CAPTIONS_PER_IMAGE}, 0, "
            f"{output_folder!r}, image_size={image_size}, workers={workers}, overwrite=True); "
            "print(time.perf_counter() - start)")
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"create_input_files failed in its process:\n{result.stderr[-3000:]}")
    return float(result.stdout.splitlines()[-1])


def steady_rate(images, seconds):
    """Images per second of the per-image part of a run; None when timing noise leaves no such part."""
    return images / seconds if seconds > 0 else None


# ---------------------------------------------------------------- GPU section

GPU_WARMUP_STEPS = 10  # cuDNN and the caching allocator settle
GPU_TIMED_STEPS = 30
GPU_RUNS = (  # name -> cfg overrides of the attention decoder's training
    ("course_fp32", {"group_captions": False, "feature_cache": False, "mixed_precision": False}),
    ("cached_fp32", {"mixed_precision": False}),
    ("cached_mixed", {"mixed_precision": True}),
    ("finetuned_fp32", {"fine_tune_encoder": True, "mixed_precision": False}),
    ("finetuned_mixed", {"fine_tune_encoder": True, "mixed_precision": True}),
)


def gpu_section(data, work, settings):
    """On CUDA: attention-decoder training samples/s of the course's path, of the frozen encoder's cache
    and of fine-tuning, in fp32 and mixed precision, with projected hours per COCO epoch."""
    if not torch.cuda.is_available():
        report("gpu", f"skipped (torch {torch.__version__} sees no CUDA device)")
        return None
    device = "cuda"
    figures = {"device": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(), "runs": {}}
    report("gpu", f"{figures['device']}, mixed precision = {'bf16' if figures['bf16'] else 'fp16 + GradScaler'}")
    cache_folder = os.path.join(work, "gpu_cache")
    cache = None
    for name, overrides in GPU_RUNS:  # the course's run first: it builds the caches the cached runs read
        overrides = dict(overrides, workers=None, cache_folder=cache_folder)  # the toolkit's CUDA loaders
        trainer = make_trainer(data, work, settings, "attention", device, **overrides)
        if trainer.uses_cache:
            check_reads_cache(trainer, cache)
        captions, seconds = time_side_by_side({name: (training_steps(trainer), GPU_TIMED_STEPS)}, GPU_WARMUP_STEPS,
                                              1, device)[name]
        rate = captions / seconds
        projection = coco_projection(rate, cache.images / cache.seconds if trainer.uses_cache else None)
        once = f" + {projection['cache_hours']:.2f} h once for the cache" if trainer.uses_cache else ""
        report(f"gpu_{name}", f"{rate:.1f} samples/s ({captions} captions in {seconds:.2f} s); COCO epoch "
                              f"{projection['epoch_hours']:.2f} h{once}")
        figures["runs"][name] = {"captions": captions, "seconds": seconds, "samples_per_s": rate,
                                 "coco_projection": projection}
        if cache is None:
            cache = build_feature_caches(trainer.encoder, data, cache_folder, device)
            report("gpu_feature_cache_build", f"{cache.images / cache.seconds:.1f} images/s ({cache.images} images "
                                              f"in {cache.seconds:.1f} s)")
        del trainer
        torch.cuda.empty_cache()
    figures["feature_cache"] = cache.figures()
    return figures


# ---------------------------------------------------------------- backbone table

def _gflops(encoder, images):
    """Floating-point operations of one forward pass (a multiply-add counts 2), in billions."""
    with FlopCounterMode(display=False) as counter:
        encoder(images)
    return counter.get_total_flops() / 1e9


def _cpu_milliseconds(encoder, images, warmups=1, runs=5):
    """Wall-clock milliseconds of one forward pass: the best of `runs` after warm-up passes (like timeit,
    the minimum: other processes on the machine can only slow a run down)."""
    for _ in range(warmups):
        encoder(images)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        encoder(images)
        seconds.append(time.perf_counter() - start)
    return 1000 * min(seconds)


def backbone_table(image_size=256, encoded_image_size=14, backbones=BACKBONES):
    """A markdown table of the backbones: C, parameters, GFLOPs and CPU ms for one image_size^2 image."""
    rows = ["| backbone | C | parameters (M) | GFLOPs | CPU ms |", "|---|---:|---:|---:|---:|"]
    images = torch.randn(1, 3, image_size, image_size)  # batch 1
    for backbone in tqdm(backbones, desc="backbones", unit="backbone"):
        encoder = Encoder(encoded_image_size, backbone, weights=None).eval()
        parameters = sum(parameter.numel() for parameter in encoder.parameters())
        with torch.inference_mode():
            gflops = _gflops(encoder, images)
            milliseconds = _cpu_milliseconds(encoder, images)
        rows.append(f"| {backbone} | {encoder.encoder_dim} | {parameters / 1e6:.1f} | {gflops:.1f} "
                    f"| {milliseconds:.0f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- main

def encoder_section(data, work, settings, feature_cache, checkpoint):
    """The toolkit's encoder pass (measured layout and chunk size) against the plain encoder at batch 50 in the
    default layout, the encoder's arithmetic rate against the machine's convolution rate, the whole test path
    (encoder and beam search of the trained attention decoder in `checkpoint`) over the same VAL images, and the
    feature cache build of the training section against a plain build. Returns the figures."""
    dataset = ImageCaptionsDataset(data.folder, data.name, "VAL")
    images = torch.stack([dataset[index][0] for index in range(min(BEAM_BATCH, len(dataset)))])  # uint8 (N, 3, S, S)
    reference = Encoder(settings.grid, settings.backbone, data.encoder_weights).eval()
    toolkit = copy.deepcopy(reference)
    plan, probe_seconds = timed(encoding_plan, toolkit, settings.image_size, len(images))  # as test will probe
    with torch.inference_mode():
        gflops_per_image = _gflops(reference, normalize_images(images[:1]))

    def reference_pass(batch):
        with torch.inference_mode():
            return reference(normalize_images(batch))

    def test_path(_):
        with contextlib.redirect_stdout(io.StringIO()):
            return solver.test(checkpoint, beam_size=BEAM_SIZE, split="VAL", batch_size=BEAM_BATCH, device="cpu",
                               coco_metrics=False)

    passes = {"reference": reference_pass, "toolkit": lambda batch: encode_images(toolkit, batch, plan),
              "test": test_path, "load": lambda _: Captioner.from_checkpoint(checkpoint, "cpu")}
    fastest = fastest_alternately(passes, settings.timing_rounds, images)
    plain_cache = plain_cache_build(reference, data, os.path.join(work, "plain_cache")).figures()
    rates = {"reference": len(images) / fastest["reference"][1], "toolkit": len(images) / fastest["toolkit"][1],
             "test": len(dataset) / fastest["test"][1],
             "test_steady": len(dataset) / (fastest["test"][1] - fastest["load"][1])}
    conv_rate = convolution_gflops_per_s()
    encoder_rate = rates["toolkit"] * gflops_per_image
    report("encoder_plan", f"{plan.describe()} (probe {probe_seconds:.1f} s, once per process)")
    report("encoder_reference_images_per_s", f"{rates['reference']:.2f} ({settings.backbone}, batch {len(images)}, "
                                             f"default layout)")
    report("encoder_images_per_s", f"{rates['toolkit']:.2f} (the toolkit's encoder pass)")
    report_ratio("encoder_speedup", rates["toolkit"] / rates["reference"])
    report("encoder_gflops_per_s", f"{encoder_rate:.0f} ({gflops_per_image:.1f} GFLOPs an image; "
                                   f"{encoder_rate / conv_rate:.0%} of this machine's convolution rate, "
                                   f"{conv_rate:.0f} GFLOPS on one 3 x 3 layer)")
    report("test_images_per_s", f"{rates['test']:.2f} (solver.test over {len(dataset)} VAL images, beam size "
                                f"{BEAM_SIZE}, the trained attention decoder of the beam section, no coco metrics; "
                                f"{rates['test'] / rates['toolkit']:.0%} of the encoder pass alone)")
    report("test_steady_images_per_s", f"{rates['test_steady']:.2f} (the same without loading the checkpoint, "
                                       f"{fastest['load'][1]:.2f} s once per call, as in a COCO-sized test: "
                                       f"{rates['test_steady'] / rates['toolkit']:.0%} of the encoder pass alone)")
    report("cache_build_reference_images_per_s", f"{plain_cache['images_per_s']:.2f} (the same caches, default "
                                                 f"layout, {BATCH_SIZE} images a call)")
    report("cache_build_images_per_s", f"{feature_cache['images_per_s']:.2f} (TRAIN + VAL, training section)")
    report_ratio("cache_build_speedup", feature_cache["images_per_s"] / plain_cache["images_per_s"])
    return {"reference_images_per_s": rates["reference"], "images_per_s": rates["toolkit"],
            "test_images_per_s": rates["test"], "test_steady_images_per_s": rates["test_steady"],
            "test_load_seconds": fastest["load"][1], "cache_build_images_per_s": feature_cache["images_per_s"],
            "cache_build_reference_images_per_s": plain_cache["images_per_s"],
            "gflops_per_image": gflops_per_image, "gflops_per_s": encoder_rate, "conv_gflops_per_s": conv_rate,
            "plan": {"channels_last": plan.memory_format == torch.channels_last, "chunk_size": plan.chunk_size},
            "probe_seconds": probe_seconds}


@torch.inference_mode()
def convolution_gflops_per_s(channels=256, side=56, batch=4, runs=5):
    """The machine's float32 convolution rate: one 3 x 3 layer of ResNet's size in channels_last, the fastest
    of `runs` calls after a warm-up (the ceiling an encoder pass can approach)."""
    layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    inputs = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
    layer(inputs)
    seconds = min(timed(layer, inputs)[1] for _ in range(runs))
    return 2 * batch * channels * channels * 9 * side * side / seconds / 1e9


def run_benchmark(settings, data_folder=None):
    """Every section, printed as it goes; returns all figures."""
    started = time.perf_counter()
    figures = {"machine": machine(), "settings": asdict(settings)}
    info = figures["machine"]
    report("machine", f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} "
                      f"threads), device cpu{', CUDA: ' + info['cuda_device'] if info['cuda_device'] else ''}")
    report("load_average_at_start", f"{info['load_average']:.2f} (1 min)")
    if info["load_average"] > BUSY_LOAD * info["cores"]:
        report("warning", f"other processes keep the CPU busy (load {info['load_average']:.1f} on {info['cores']} "
                          f"cores): torch's threads then wait for each other, which slows small operations (decoder "
                          f"steps, one-image beam search) far more than large ones (the encoder); rerun on an idle "
                          f"machine for figures to publish")
    report("settings", f"{settings.backbone} (random weights as weights=None, BatchNorm statistics of "
                       f"{CALIBRATION_IMAGES} train images) at {settings.image_size} x {settings.image_size}, "
                       f"{settings.grid} x {settings.grid} grid, batch {BATCH_SIZE}, embed/attention/decoder "
                       f"{settings.dims}, shapes: {settings.train_images} train + {settings.val_images} val images "
                       f"x {CAPTIONS_PER_IMAGE} captions")
    with tempfile.TemporaryDirectory(prefix="bench_") as work:
        data_folder = data_folder or os.path.join(work, "data")
        data = make_bench_data(data_folder, work, settings)
        training_figures, trained_checkpoint = training_section(data, work, settings)
        figures.update(training_figures)
        mismatches = sum(beam["mismatches"] for beam in figures["beam"].values())
        report("beam_mismatches", f"{mismatches}")
        figures["beam_mismatches"] = mismatches
        figures["encoder"] = encoder_section(data, work, settings, figures["feature_cache"], trained_checkpoint)
        figures["preprocess"] = preprocess_section(work, settings)
        figures["gpu"] = gpu_section(data, work, settings)
    figures["load_average_at_end"] = os.getloadavg()[0]
    figures["wall_seconds"] = time.perf_counter() - started
    report("load_average_at_end", f"{figures['load_average_at_end']:.2f} (1 min)")
    report("wall_time", f"{figures['wall_seconds']:.0f} s")
    return figures


# ---------------------------------------------------------------- several processes (bench.py --ddp)

DDP_WORLDS = (1, 2)  # processes, one thread each
DDP_WARMUP_STEPS = 3
DDP_TIMED_STEPS = 20
ALLREDUCE_ROUNDS = 20  # the all-reduce time is the fastest of this many


def ddp_section(settings):
    """Training samples per second of 1 process against 2 (torchrun, gloo, one thread each) on the bench
    data, and the time of one all-reduce of the decoder's gradients. Returns the figures."""
    info = machine()
    report("load_average_at_start", f"{info['load_average']:.2f} (1 min, {info['cores']} cores)")
    figures = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as work:
        make_bench_data(os.path.join(work, "data"), work, settings)
        for world in DDP_WORLDS:
            json_path = os.path.join(work, f"ddp{world}.json")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                       os.path.abspath(__file__), "--ddp-worker", work, "--json", json_path]
            command += ["--quick"] if settings == QUICK else []
            subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            with open(json_path, encoding="utf-8") as file:
                figures[world] = json.load(file)
            report(f"ddp_train_{world}_process", f"{figures[world]['samples_per_s']:.2f} samples/s (attention "
                                                 f"decoder, batch {BATCH_SIZE} per process, one thread each)")
    report_ratio("ddp_speedup", figures[2]["samples_per_s"] / figures[1]["samples_per_s"])
    allreduce = figures[2]["allreduce"]
    report("ddp_allreduce", f"{allreduce['seconds'] * 1e3:.2f} ms for {allreduce['parameters']:,} gradients "
                            f"({allreduce['parameters'] * 4 / 1e6:.1f} MB, gloo, 2 processes)")
    figures["load_average_at_end"] = os.getloadavg()[0]
    report("load_average_at_end", f"{figures['load_average_at_end']:.2f} (1 min)")
    return figures


def ddp_worker(work, settings, json_path):
    """One process of ddp_section (started by torchrun): timed training steps of the bench's attention
    decoder on its shard, then the all-reduce of the decoder's gradients; rank 0 writes the figures."""
    torch.set_num_threads(1)
    data = BenchData(os.path.join(work, "data"), base_name("shapes", CAPTIONS_PER_IMAGE, 0),
                     os.path.join(work, f"{settings.backbone}.pth"))
    trainer = make_trainer(data, work, settings, "attention", run_name=f"ddp{os.environ['WORLD_SIZE']}")
    ranks = trainer.ranks
    steps = training_steps(trainer)
    for _ in itertools.islice(steps, DDP_WARMUP_STEPS):
        pass
    ranks.barrier()
    captions, seconds = timed(lambda: sum(n for n, _ in itertools.islice(steps, DDP_TIMED_STEPS)))
    ranks.barrier()
    (all_captions,) = ranks.sum(captions)
    allreduce_seconds = min(timed(ranks.average_gradients, trainer.decoder_module)[1]
                            for _ in range(ALLREDUCE_ROUNDS))
    parameters = sum(p.numel() for p in trainer.decoder_module.parameters() if p.requires_grad)
    if ranks.is_main:
        with atomic_path(json_path) as tmp, open(tmp, "w", encoding="utf-8") as file:
            json.dump({"world_size": ranks.world_size, "samples_per_s": all_captions / seconds,
                       "allreduce": {"seconds": allreduce_seconds, "parameters": parameters}}, file)
    trainer.log.close()
    trainer.lock.release()
    ranks.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per part: small backbone and images")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--data-folder", help="write the bench's shapes data here and keep it (default: a "
                                              "temporary folder)")
    parser.add_argument("--backbones", action="store_true", help="print the table of encoder backbones instead")
    parser.add_argument("--ddp", action="store_true", help="training in 1 against 2 processes (torchrun) instead")
    parser.add_argument("--ddp-worker", metavar="WORK", help=argparse.SUPPRESS)  # one process of --ddp
    args = parser.parse_args(argv)
    if args.backbones:
        print(backbone_table())
        return
    settings = QUICK if args.quick else FULL
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, settings, args.json)
        return
    figures = ddp_section(settings) if args.ddp else run_benchmark(settings, args.data_folder)
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w", encoding="utf-8") as file:
            json.dump(figures, file, indent=1)


if __name__ == "__main__":
    run_cli(main)

