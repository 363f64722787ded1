"""The encoder pass of inference (test, caption, feature caches), with one fixed plan per device.

A plan is the memory layout, the number of images per call and the autocast precision. channels_last is the
layout in which cuDNN's and oneDNN's convolutions are fastest. On CUDA the whole batch goes through at once in
bfloat16 autocast (float16 where the GPU has no bfloat16); on the CPU in float32, 4 images a call, the fastest
chunk on a 2-core CPU (docs/benchmarks.md). A plan is fixed, never measured on the spot: the same images give
the same features on a busy machine and an idle one.
"""
from dataclasses import dataclass

import torch

from images import normalize_images

CPU_CHUNK = 4  # images per encoder call on the CPU


@dataclass(frozen=True)
class EncodingPlan:
    """How to run an encoder: its memory layout, the images per call, the autocast dtype (None: float32)."""
    memory_format: torch.memory_format = torch.channels_last
    chunk_size: int = CPU_CHUNK
    autocast_dtype: torch.dtype | None = None


def inference_plan(device, batch_size):
    """The plan of an encoder pass on `device` over batches of up to `batch_size` images."""
    device = torch.device(device)
    if device.type != "cuda":
        return EncodingPlan(torch.channels_last, max(1, min(CPU_CHUNK, batch_size)), None)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return EncodingPlan(torch.channels_last, max(1, batch_size), dtype)


def encode_images(encoder, images, plan):
    """uint8 images (B, 3, S, S) on the encoder's device -> float32 encodings (B, G, G, C), chunk by chunk as the
    plan says. Runs under inference_mode: for testing, captioning and feature caches, not for training."""
    encoder.to(memory_format=plan.memory_format)
    autocast = torch.autocast(images.device.type, dtype=plan.autocast_dtype or torch.float32,
                              enabled=plan.autocast_dtype is not None)
    with torch.inference_mode(), autocast:
        grids = [encoder(normalize_images(chunk).contiguous(memory_format=plan.memory_format)).float()
                 for chunk in images.split(plan.chunk_size)]  # each (b, G, G, C)
    return torch.cat(grids)  # (B, G, G, C)
