"""The encoder's sections: the toolkit's inference pass against the plain encoder, the whole test path, the
feature cache build against a plain build, and the table of backbones."""
import contextlib
import copy
import io
import os
import time
from unittest import mock

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import features
import solver
from backbones import BACKBONES
from benchmarks.common import (BATCH_SIZE, BEAM_BATCH, BEAM_SIZE, build_feature_caches, fastest_alternately, report,
                               report_ratio, timed)
from captioner import Captioner
from datasets import ImageCaptionsDataset
from encoding import EncodingPlan, encode_images, inference_plan
from images import normalize_images
from models import Encoder

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


def _meta_gflops(encoded_image_size, backbone, image_size):
    """_gflops of one image_size^2 image, counted on the meta device: shapes only, and every projection of
    nn.MultiheadAttention counted (on the CPU its inference fast path hides them from the counter: ViTs, CLIP's)."""
    with torch.device("meta"):
        encoder = Encoder(encoded_image_size, backbone, weights=None).eval()
        return _gflops(encoder, torch.zeros(1, 3, image_size, image_size))


def backbone_table(image_size=256, encoded_image_size=14, backbones=BACKBONES):
    """A markdown table of the backbones: C, parameters, GFLOPs and CPU ms for one image_size^2 image."""
    rows = ["| backbone | C | parameters (M) | GFLOPs | CPU ms |", "|---|---:|---:|---:|---:|"]
    images = torch.randn(1, 3, image_size, image_size)  # batch 1
    for backbone in tqdm(backbones, desc="backbones", unit="backbone"):
        encoder = Encoder(encoded_image_size, backbone, weights=None).eval()
        parameters = sum(parameter.numel() for parameter in encoder.parameters())
        gflops = _meta_gflops(encoded_image_size, backbone, image_size)
        with torch.inference_mode():
            milliseconds = _cpu_milliseconds(encoder, images)
        rows.append(f"| {backbone} | {encoder.encoder_dim} | {parameters / 1e6:.1f} | {gflops:.1f} "
                    f"| {milliseconds:.0f} |")
    return "\n".join(rows)

def encoder_section(data, work, settings, feature_cache, checkpoint):
    """The toolkit's encoder pass (its CPU plan: layout and chunk size) against the plain encoder at batch 50 in the
    default layout, the encoder's arithmetic rate against the machine's convolution rate, the whole test path
    (encoder and beam search of the trained attention decoder in `checkpoint`) over the same VAL images, and the
    feature cache build of the training section against a plain build. Returns the figures."""
    dataset = ImageCaptionsDataset(data.folder, data.name, "VAL")
    images = torch.stack([dataset[index][0] for index in range(min(BEAM_BATCH, len(dataset)))])  # uint8 (N, 3, S, S)
    reference = Encoder(settings.grid, settings.backbone, data.encoder_weights).eval()
    toolkit = copy.deepcopy(reference)
    plan = inference_plan("cpu", len(images))  # as test and caption run it
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
    report("encoder_plan", f"{'channels_last' if plan.memory_format == torch.channels_last else 'default layout'}, "
                           f"{plan.chunk_size} images a call")
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
            "plan": {"channels_last": plan.memory_format == torch.channels_last, "chunk_size": plan.chunk_size}}


@torch.inference_mode()
def convolution_gflops_per_s(channels=256, side=56, batch=4, runs=5):
    """The machine's float32 convolution rate: one 3 x 3 layer of ResNet's size in channels_last, the fastest
    of `runs` calls after a warm-up (the ceiling an encoder pass can approach)."""
    layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    inputs = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
    layer(inputs)
    seconds = min(timed(layer, inputs)[1] for _ in range(runs))
    return 2 * batch * channels * channels * 9 * side * side / seconds / 1e9

def plain_cache_build(encoder, data, cache_folder):
    """The TRAIN and VAL feature caches built the plain way, timed: the default layout and the whole batch a call,
    instead of the device's plan (the baseline of cache_build_speedup)."""
    def plain_plan(device, batch_size):
        return EncodingPlan(torch.contiguous_format, batch_size)
    with mock.patch.object(features, "inference_plan", plain_plan):
        return build_feature_caches(encoder, data, cache_folder, "cpu")
