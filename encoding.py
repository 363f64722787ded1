"""The encoder pass at the speed of the device it runs on.

How fast a CNN encodes depends on the memory layout of its tensors and on how many images it takes at
once, and the best pair differs between devices: on a 2-core CPU a ResNet-101 encodes about 2.4 times
faster in channels_last at 4 images a call than in the default layout at 50. `encoding_plan` measures the
candidates once per (device, backbone, image size, grid) and process; `encode_images` runs the encoder
that way. The layouts and chunk sizes compute the same function: results differ only within float tolerance.
"""
import sys
import time
from dataclasses import dataclass

import torch

from images import normalize_images

CHUNK_SIZES = (1, 4, 16, 64, 256)  # the chunk sizes a probe tries below its limit, smallest first
LAYOUTS = (torch.contiguous_format, torch.channels_last)
SLOWER_STOP = 0.9  # a layout's probe stops growing the chunk when its rate falls below this share of its best
LOSING = 0.5  # ... or below this share of the best rate of any layout
PROBE_SECONDS = 10.0  # past MIN_PROBED_CHUNK, the probe tries no larger chunk once it has spent this long
MIN_PROBED_CHUNK = 16  # chunk sizes up to this one are always tried (single images suffer most on a busy CPU)
_plans = {}  # (device, backbone, image size, grid, chunk limit) -> EncodingPlan, measured once per process


@dataclass(frozen=True)
class EncodingPlan:
    """How to run an encoder: its memory layout and the number of images per call."""
    memory_format: torch.memory_format
    chunk_size: int
    images_per_s: float = None  # what the probe measured (None: not measured)

    def describe(self):
        layout = "channels_last" if self.memory_format == torch.channels_last else "default layout"
        rate = f", {self.images_per_s:.1f} images/s measured" if self.images_per_s else ""
        return f"{layout}, {self.chunk_size} images per call{rate}"


def cache_plan(device, batch_size):
    """The fixed plan of a feature-cache build: channels_last, 4 images a call on the CPU and the whole batch
    elsewhere. Fixed rather than probed: a cache's features must not depend on how busy the machine was when it
    was built (runs and resumes stay repeatable). On this project's 2-core Intel CPU (2026-12-02, idle) 4 a call
    is the fastest for ResNet-101 at 256 px (12.5 images/s against 10.8 at 16 and 7.1 in the default layout at
    32) and within 8 % of the fastest for EfficientNet-Lite0 at 192 px (115.5 against 124.6 at 8 and 45.6)."""
    chunk = min(4, batch_size) if torch.device(device).type == "cpu" else batch_size
    return EncodingPlan(torch.channels_last, max(1, chunk))


def encoder_device(encoder):
    return next(encoder.parameters()).device


def set_memory_format(encoder, memory_format):
    """Put the encoder's weights in `memory_format` (in place; a no-op when they already are)."""
    encoder.to(memory_format=memory_format)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(encoder, images):
    """Wall time of one call of the encoder on `images` (a chunk)."""
    started = time.perf_counter()
    encoder(images)
    synchronize(images.device)
    return time.perf_counter() - started


def images_per_second(encoder, images, least_images=MIN_PROBED_CHUNK):
    """Rate of the encoder on chunks like `images` over at least least_images images, after one warm-up call
    (so that a small chunk's rate is not one lucky moment of a busy CPU)."""
    seconds_per_call(encoder, images)
    calls = -(-least_images // len(images))  # ceil
    return calls * len(images) / sum(seconds_per_call(encoder, images) for _ in range(calls))


def probe_sizes(chunk_limit, chunk_sizes=CHUNK_SIZES):
    """The chunk sizes worth trying for passes of at most chunk_limit images: those below it, and it."""
    return [size for size in chunk_sizes if size < chunk_limit] + [chunk_limit]


@torch.inference_mode()
def probe_plan(encoder, image_size, chunk_limit, layouts=LAYOUTS):
    """Measure images/s of the eval-mode encoder on random images, each layout at growing chunk sizes (up to
    chunk_limit), the layouts side by side; a layout stops growing past its peak or when it is clearly losing,
    and past MIN_PROBED_CHUNK no larger size is tried once the probe has taken PROBE_SECONDS.
    Returns the fastest as an EncodingPlan; the encoder is left in the plan's layout."""
    device = encoder_device(encoder)
    was_training = encoder.training
    encoder.eval()
    sizes = probe_sizes(chunk_limit)
    noise = torch.randn(sizes[-1], 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    best, layout_best, growing = None, dict.fromkeys(layouts, 0.0), list(layouts)
    started = time.perf_counter()
    for size in sizes:
        if size > MIN_PROBED_CHUNK and time.perf_counter() - started > PROBE_SECONDS:
            break
        for memory_format in list(growing):
            set_memory_format(encoder, memory_format)
            images = noise[:size].contiguous(memory_format=memory_format)
            rate = images_per_second(encoder, images)
            if best is None or rate > best.images_per_s:
                best = EncodingPlan(memory_format, size, rate)
            if rate < SLOWER_STOP * layout_best[memory_format] or rate < LOSING * best.images_per_s:
                growing.remove(memory_format)
            layout_best[memory_format] = max(layout_best[memory_format], rate)
    encoder.train(was_training)
    set_memory_format(encoder, best.memory_format)
    return best


def encoding_plan(encoder, image_size, chunk_limit):
    """The fastest plan for this encoder on its device for passes of up to chunk_limit images, measured on
    first use and then remembered; the encoder is put in the plan's layout."""
    device = encoder_device(encoder)
    key = (str(device), encoder.backbone_name, image_size, encoder.encoded_image_size, chunk_limit)
    if key not in _plans:
        _plans[key] = probe_plan(encoder, image_size, chunk_limit)
        print(f"note: encoder pass of {encoder.backbone_name} at {image_size} px on {device}, up to {chunk_limit} "
              f"images at once: {_plans[key].describe()}", file=sys.stderr)
    set_memory_format(encoder, _plans[key].memory_format)
    return _plans[key]


_training_layouts = {}  # (device, backbone, image size, grid, batch, trains) -> memory format, measured once


def seconds_per_step(encoder, images, trains):
    """Wall time of the encoder's part of a training step: forward, and backward when some weights train."""
    started = time.perf_counter()
    with torch.set_grad_enabled(trains):
        grid = encoder(images)
        if trains:
            grid.float().sum().backward()
    synchronize(images.device)
    return time.perf_counter() - started


def probe_training_layout(encoder, image_size, batch_size, layouts=LAYOUTS):
    """The memory layout in which the encoder's part of a training step on one batch is fastest, measured on
    random images (best of two steps each); BatchNorm statistics, mode and gradients are left as they were,
    the weights in the chosen layout."""
    device = encoder_device(encoder)
    was_training = encoder.training
    encoder.eval()  # BatchNorm keeps its running statistics
    trains = any(parameter.requires_grad for parameter in encoder.parameters())
    noise = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    seconds = {}
    for memory_format in layouts:
        set_memory_format(encoder, memory_format)
        images = noise.contiguous(memory_format=memory_format)
        seconds[memory_format] = min(seconds_per_step(encoder, images, trains) for _ in range(2))
    for parameter in encoder.parameters():
        parameter.grad = None
    encoder.train(was_training)
    fastest = min(seconds, key=seconds.get)
    set_memory_format(encoder, fastest)
    return fastest


def training_layout(encoder, image_size, batch_size):
    """The fastest memory layout for training steps with this encoder in the loop, measured on first use and
    then remembered; the encoder is put in it."""
    device = encoder_device(encoder)
    trains = any(parameter.requires_grad for parameter in encoder.parameters())
    key = (str(device), encoder.backbone_name, image_size, encoder.encoded_image_size, batch_size, trains)
    if key not in _training_layouts:
        _training_layouts[key] = probe_training_layout(encoder, image_size, batch_size)
        layout = "channels_last" if _training_layouts[key] == torch.channels_last else "default layout"
        print(f"note: training steps of {encoder.backbone_name} at {image_size} px on {device}, {batch_size} images "
              f"a batch: {layout} (measured)", file=sys.stderr)
    set_memory_format(encoder, _training_layouts[key])
    return _training_layouts[key]


def encode_images(encoder, images, plan=None):
    """uint8 images (B, 3, S, S) on the encoder's device -> encodings (B, G, G, C), chunk by chunk in the
    plan's memory layout (when plan is None: the fastest one measured for batches of this size). Runs under
    inference_mode: for testing, captioning and feature caches, not for training."""
    plan = plan or encoding_plan(encoder, images.shape[-1], len(images))
    with torch.inference_mode():
        grids = [encoder(normalize_images(chunk).contiguous(memory_format=plan.memory_format))
                 for chunk in images.split(plan.chunk_size)]  # each (b, G, G, C)
        return torch.cat(grids)  # (B, G, G, C)
