"""`python bench.py --gpu`: the toolkit on a CUDA GPU at COCO's sizes, in about 5 minutes on an H100 or H200.

Training samples/s of every decoder at the course's batch and at the recommended GPU batch, bf16 and fp32, with
the encoder frozen (feature cache, or in the loop) and fine-tuned, beside the course's own path; where a step's
time goes (torch.profiler: the GPU's busy share, kernel launches and host synchronisations per step); SCST; the
encoder pass against a bare bf16 pass; the feature cache build; `test`; the projected COCO epoch.
On a machine without CUDA, `--gpu --quick` runs the same code on the CPU at tiny sizes (for the tests).
"""
import contextlib
import gc
import io
import itertools
import os
from dataclasses import dataclass

import torch

import solver
from benchmarks.coco_sized import COCO_VOCABULARY, make_coco_sized_data
from benchmarks.common import (BATCH_SIZE, CAPTIONS_PER_IMAGE, build_feature_caches, fastest_alternately,
                               make_trainer, report, report_ratio, synchronize, time_side_by_side, timed,
                               training_steps)
from benchmarks.decoders import scst_section
from datasets import ImageCaptionsDataset
from encoding import encode_images, inference_plan
from images import normalize_images
from loaders import default_workers
from models import Encoder

COCO_EPOCH_CAPTIONS = 566_435  # Karpathy train + restval: 113,287 images, their 5 sampled captions
RECOMMENDED_BATCH = 160  # captions (32 images x 5): the GPU recipe of the README
RECOMMENDED_LR = 1.2e-3  # the decoder's learning rate at that batch
LARGE_BATCH, LARGE_LR = 320, 1.6e-3  # the batch of the earlier GPU figures (docs/benchmarks.md) and its rate
ENCODER_BATCH = 128  # images per call of the inference encoder pass
ENCODER_CALLS, ENCODER_ROUNDS = 5, 5  # its timing: calls a timing, timings of each pass
MOST_WARMUP_STEPS = 200  # untimed steps of a run at most, waiting for its graphs to be captured


@dataclass(frozen=True)
class GpuSizes:
    """The sizes of a --gpu run (backbone, grid and dims are what benchmarks.common.make_trainer reads)."""
    backbone: str
    image_size: int
    grid: int
    dims: int
    transformer_layers: int
    vocabulary: int
    train_images: int
    val_images: int
    quiet_steps: int  # untimed steps of a run: until this many in a row captured no CUDA graph
    timed_steps: int
    scst_steps: int
    recommended_batch: int
    large_batch: int


GPU_FULL = GpuSizes("resnet101", 256, 14, 512, 6, COCO_VOCABULARY, 2048, 1024, 30, 20, 5, RECOMMENDED_BATCH,
                    LARGE_BATCH)
GPU_QUICK = GpuSizes("resnet18", 64, 4, 64, 1, 400, 12, 8, 1, 2, 1, 60, 120)


def runs(sizes):
    """(name, decoder, batch, cfg overrides) of every timed training run; the course's path first."""
    course, recommended = BATCH_SIZE, sizes.recommended_batch
    fast = {"decoder_lr": RECOMMENDED_LR}
    yield "course_path_fp32_b32", "attention", course, {"group_captions": False, "feature_cache": False,
                                                       "mixed_precision": False, "cuda_graphs": False}
    for decoder in ("attention", "rnn", "adaptive", "transformer"):
        yield f"{decoder}_cache_bf16_b32", decoder, course, {}
        yield f"{decoder}_cache_bf16_b{recommended}", decoder, recommended, fast
    yield f"attention_cache_bf16_b{sizes.large_batch}", "attention", sizes.large_batch, {"decoder_lr": LARGE_LR}
    yield f"transformer_cache_bf16_b{recommended}_graphs", "transformer", recommended, dict(fast, cuda_graphs=True)
    yield "attention_cache_bf16_b32_no_graphs", "attention", course, {"cuda_graphs": False}
    yield f"attention_cache_bf16_b{recommended}_no_graphs", "attention", recommended, dict(fast, cuda_graphs=False)
    yield "attention_cache_fp32_b32", "attention", course, {"mixed_precision": False}
    yield f"attention_cache_fp32_b{recommended}", "attention", recommended, dict(fast, mixed_precision=False)
    yield "attention_no_cache_bf16_b32", "attention", course, {"feature_cache": False}
    yield f"attention_no_cache_bf16_b{recommended}", "attention", recommended, dict(fast, feature_cache=False)
    yield "attention_finetuned_bf16_b32", "attention", course, {"fine_tune_encoder": True}
    yield f"attention_finetuned_bf16_b{recommended}", "attention", recommended, dict(fast, fine_tune_encoder=True)
    yield f"attention_finetuned_fp32_b{recommended}", "attention", recommended, dict(fast, fine_tune_encoder=True,
                                                                                     mixed_precision=False)


def gpu_section(work, quick=False):
    """Every --gpu figure, printed as it goes; returns them."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not quick:
        report("gpu", f"skipped (torch {torch.__version__} sees no CUDA device; --gpu --quick runs it on the CPU)")
        return None
    sizes = GPU_QUICK if quick else GPU_FULL
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    report("gpu", f"{name}, torch {torch.__version__}, {sizes.backbone} at {sizes.image_size} px, "
                  f"{sizes.grid} x {sizes.grid} grid, widths {sizes.dims}, vocabulary {sizes.vocabulary:,}")
    data = make_coco_sized_data(os.path.join(work, "gpu_data"), work, sizes.backbone, sizes.train_images,
                                sizes.val_images, sizes.image_size, sizes.vocabulary)
    common = {"workers": None, "cache_folder": os.path.join(work, "gpu_cache"), "max_steps": 50,
              "transformer_layers": sizes.transformer_layers, "transformer_encoder_layers": sizes.transformer_layers,
              "lr_warmup_steps": 0, "overwrite": True}
    figures = {"device": name, "sizes": sizes.__dict__, "runs": {}}
    encoder = Encoder(sizes.grid, sizes.backbone, data.encoder_weights).to(device).eval()
    figures["encoder"] = encoder_figures(encoder, data, device)
    # The loader workers train(cfg) gives the build: reading in this process would wait on h5py's lock while the
    # writer thread writes the previous batch.
    cache = build_feature_caches(encoder, data, common["cache_folder"], device, ENCODER_BATCH,
                                 default_workers(common))
    figures["cache_build"] = cache_build_figures(cache, figures["encoder"]["toolkit"])
    del encoder
    for run, decoder, batch, overrides in runs(sizes):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = make_trainer(data, work, sizes, decoder, device, batch_size=batch, run_name=run,
                               **dict(common, **overrides))
        steps = training_steps(trainer)
        warmup = warm_up(steps, trainer, sizes.quiet_steps)
        graphs = graph_count(trainer)
        captions, seconds = time_side_by_side({run: (steps, sizes.timed_steps)}, 0, 1, device)[run]
        captured_while_timed = graph_count(trainer) - graphs
        rate = captions / seconds
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        figures["runs"][run] = {"samples_per_s": rate, "captions": captions, "seconds": seconds,
                                "coco_epoch_minutes": COCO_EPOCH_CAPTIONS / rate / 60, "peak_memory_gib": peak,
                                "warmup_steps": warmup, "graphs": graphs + captured_while_timed,
                                "graphs_captured_while_timed": captured_while_timed}
        captured = f", {captured_while_timed} of them captured while timed" if captured_while_timed else ""
        report(f"gpu_train_{run}", f"{rate:,.0f} samples/s (COCO epoch {COCO_EPOCH_CAPTIONS / rate / 60:.1f} min, "
                                   f"peak memory {peak:.1f} GiB, {warmup} warm-up steps, "
                                   f"{graphs + captured_while_timed} CUDA graphs{captured})")
        if run == f"attention_cache_bf16_b{sizes.recommended_batch}":
            figures["profile"] = profile_steps(steps, seconds / sizes.timed_steps, device)
            figures["scst"] = scst_section(trainer, data, work, sizes, device, **common)
            figures["test"] = test_figures(trainer, data, device)
        trainer.lock.release()
        del trainer, steps
        gc.collect()  # the decoder and its CUDA graphs refer to each other: free their memory pools now
        if device == "cuda":
            torch.cuda.empty_cache()
    ratio = figures["runs"]["attention_cache_bf16_b32"]["samples_per_s"] / \
        figures["runs"]["course_path_fp32_b32"]["samples_per_s"]
    report_ratio("gpu_speedup_over_course_b32", ratio)
    figures["speedup_over_course_b32"] = ratio
    return figures


def graph_count(trainer):
    """The CUDA graphs the trainer's decoder has captured so far (0 without graphs)."""
    graphs = trainer.decoder_module.training_graphs
    return 0 if graphs is None else len(graphs.graphs)


def warm_up(steps, trainer, quiet_steps, most_steps=MOST_WARMUP_STEPS):
    """Untimed training steps until `quiet_steps` in a row have captured no new CUDA graph (at most `most_steps`):
    the timed steps then replay graphs, as nearly all of a COCO run's do, rather than capture them (a capture runs
    its segment eagerly three times first). Returns the steps run."""
    run = quiet = 0
    while quiet < quiet_steps and run < most_steps:
        before = graph_count(trainer)
        next(steps)
        run += 1
        quiet = quiet + 1 if graph_count(trainer) == before else 0
    return run


def profile_steps(steps, step_seconds, device, count=5):
    """Per training step (torch.profiler over `count` steps): kernel launches, host synchronisations, and the
    GPU's busy share of a step of `step_seconds` (timed without the profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in itertools.islice(steps, count):
            pass
        synchronize(device)
    events = profiler.events()
    launches = sum(event.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC") for event in events)
    graph_launches = sum(event.name == "cudaGraphLaunch" for event in events)
    syncs = sum(event.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
                for event in events)
    kernel_us = sum(getattr(event, "device_time", 0) for event in events
                    if event.device_type == torch.autograd.DeviceType.CUDA)
    busy = kernel_us / 1e6 / count / step_seconds
    report("gpu_step_profile", f"{launches / count:.0f} kernel launches, {graph_launches / count:.0f} graph "
                               f"launches, {syncs / count:.1f} host synchronisations per step; the GPU busy "
                               f"{busy:.0%} of a {step_seconds * 1e3:.1f} ms step")
    top = sorted(profiler.key_averages(), key=lambda average: -getattr(average, "self_device_time_total", 0))[:12]
    heaviest = [{"name": average.key[:80], "calls_per_step": average.count / count,
                 "device_ms_per_step": getattr(average, "self_device_time_total", 0) / 1e3 / count} for average in top]
    for row in heaviest:
        report("gpu_step_heaviest", f"{row['device_ms_per_step']:7.2f} ms {row['calls_per_step']:6.0f} calls  "
                                    f"{row['name']}")
    return {"kernel_launches": launches / count, "graph_launches": graph_launches / count,
            "synchronisations": syncs / count, "busy_share": busy, "step_seconds": step_seconds,
            "heaviest": heaviest}


@torch.inference_mode()
def encoder_figures(encoder, data, device):
    """Images/s of the toolkit's inference pass (encode_images with the device's plan) and of a bare bf16
    channels_last pass over the same uint8 images."""
    dataset = ImageCaptionsDataset(data.folder, data.name, "VAL")
    images = torch.stack([dataset[index][0] for index in range(min(ENCODER_BATCH, len(dataset)))]).to(device)
    plan = inference_plan(device, len(images))
    bare = encoder.to(memory_format=torch.channels_last)

    def bare_pass():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return bare(normalize_images(images).contiguous(memory_format=torch.channels_last))

    passes = {"toolkit": lambda: encode_images(encoder, images, plan), "bare": bare_pass}
    for function in passes.values():
        function()  # warm-up: cuDNN picks its algorithms
    # ENCODER_CALLS calls a timing, the passes in turn, the fastest of ENCODER_ROUNDS timings each.
    fastest = fastest_alternately({name: lambda function=function: [function() for _ in range(ENCODER_CALLS)]
                                   for name, function in passes.items()}, ENCODER_ROUNDS, device=device)
    rates = {name: len(images) * ENCODER_CALLS / seconds for name, (_, seconds) in fastest.items()}
    report("gpu_encoder_images_per_s", f"{rates['toolkit']:,.0f} (the toolkit's pass), {rates['bare']:,.0f} (a bare "
                                       f"bf16 channels_last pass): {rates['toolkit'] / rates['bare']:.0%}")
    return rates


def cache_build_figures(cache, encoder_rate):
    """The cache build's images/s over both splits, and past each build's start-up (fingerprint, loader workers,
    the file), which a COCO-sized build approaches: the TRAIN split holds more images than VAL, so its extra
    images over its extra seconds (TRAIN is built first: anything done once is counted there, against it)."""
    figures = cache.figures()
    (train, val), (train_seconds, val_seconds) = cache.split_images, cache.split_seconds
    past_start = (train - val) / (train_seconds - val_seconds) if train > val and train_seconds > val_seconds else None
    figures["images_per_s_past_start"] = past_start
    figures["start_seconds"] = val_seconds - val / past_start if past_start else None
    line = f"{figures['images_per_s']:,.0f} ({cache.images} images, {figures['images_per_s'] / encoder_rate:.0%} of " \
           f"the encoder pass)"
    if past_start:
        line += f"; past each build's start-up ({figures['start_seconds']:.2f} s): {past_start:,.0f} " \
                f"({past_start / encoder_rate:.0%})"
    report("gpu_cache_build_images_per_s", line)
    return figures


def test_figures(trainer, data, device):
    """Images/s of solver.test over the VAL split (encoder, batched beam search of 3, the course's BLEU; no
    coco-caption metrics) with the trainer's weights."""
    trainer.save(is_best=True)
    images = len(ImageCaptionsDataset(data.folder, data.name, "VAL"))
    with contextlib.redirect_stdout(io.StringIO()):
        _, seconds = timed(lambda: solver.test(trainer.paths.best, split="VAL", batch_size=ENCODER_BATCH,
                                               device=device, coco_metrics=False), device=device)
    report("gpu_test_images_per_s", f"{images / seconds:,.0f} ({images} VAL images, beam size 3, checkpoint load "
                                    f"included; 5,000 COCO images in {5000 / (images / seconds):.1f} s)")
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "captions_per_image": CAPTIONS_PER_IMAGE}
