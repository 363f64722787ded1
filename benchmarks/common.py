"""What every benchmark section shares: the sizes of a run, the bench data, timing and reporting."""
import contextlib
import itertools
import math
import os
import platform
import time
from dataclasses import dataclass

import h5py
import torch
from torch import nn
from torchvision.models import get_model

import features
from config import validate_cfg
from create_input_files import create_input_files
from data_files import base_name
from datasets import ImageCaptionsDataset
from images import normalize_images
from shapes import IMAGE_FOLDER, make_shapes_dataset
from training import Trainer

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


def fastest_alternately(functions, rounds, *args, device="cpu"):
    """Call each of `functions` (a dict) with `args`, in turn, `rounds` times over, so that every one sees
    the same load of the machine; returns {name: (result, seconds of its fastest call)}, the call least
    disturbed by the rest of the machine."""
    fastest = {}
    for _ in range(rounds):
        for name, function in functions.items():
            result, seconds = timed(function, *args, device=device)
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
    epoch; yields (captions in the batch, loss tensor)."""
    trainer.decoder.train()
    trainer.encoder.train(trainer.cfg["fine_tune_encoder"])  # a frozen encoder stays in eval mode
    for epoch in itertools.count():
        trainer.train_loader.sampler.set_epoch(epoch)
        for batch in trainer.train_loader:
            stats = trainer.train_step(batch)
            yield batch[2].numel(), stats["loss"][0]  # lengths: (B, 1) per caption, (B, cpi) grouped; the loss
            # as a 0-d tensor on the device: reading it would wait for the step


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
    """The TRAIN and VAL feature caches built (and timed, each on its own) by the benchmark."""
    paths: tuple
    stamps: tuple  # st_mtime_ns of each file right after the build
    split_images: tuple  # images of each cache
    split_seconds: tuple  # seconds of each build

    @property
    def images(self):
        return sum(self.split_images)

    @property
    def seconds(self):
        return sum(self.split_seconds)

    def figures(self):
        return {"images": self.images, "seconds": self.seconds, "images_per_s": self.images / self.seconds,
                "split_images": list(self.split_images), "split_seconds": list(self.split_seconds)}


def build_feature_caches(encoder, data, cache_folder, device, batch_size=BATCH_SIZE, workers=0):
    """Build the TRAIN and VAL feature caches as train(cfg) does (with that many loader workers), each timed."""
    encoder.eval()
    builds = [timed(lambda split=split: features.ensure_feature_cache(encoder, data.folder, data.name, split,
                                                                      cache_folder, batch_size=batch_size,
                                                                      workers=workers, device=device),
                    device=device)
              for split in ("TRAIN", "VAL")]
    paths = tuple(path for path, _ in builds)
    images = []
    for path in paths:
        with h5py.File(path, "r") as h5:
            images.append(len(h5["features"]))
    return FeatureCache(paths, tuple(os.stat(path).st_mtime_ns for path in paths), tuple(images),
                        tuple(seconds for _, seconds in builds))


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
