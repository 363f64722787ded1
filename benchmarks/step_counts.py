"""What one attention training step asks of the device at COCO's sizes, counted: its aten operations (kernel
launches on a GPU, in eager mode) and its host synchronisations; and the positions the CUDA graphs of the
recurrence compute for each one a caption needs. The counts are the same on every machine, so bench.py prints
them on the CPU too."""
import os

import numpy as np
import torch

from benchmarks.coco_sized import COCO_MAX_WORDS, COCO_VOCABULARY, caption_lengths, make_coco_sized_data
from benchmarks.common import BATCH_SIZE, CAPTIONS_PER_IMAGE, SEED, make_trainer, report
from benchmarks.gpu import RECOMMENDED_BATCH
from benchmarks.op_counts import OpCounter, trainer_tensors
from cuda_graphs import SEGMENT_STEPS, segments

COUNT_TRAIN_IMAGES = 192  # the fewest images whose captions use every word of COCO's vocabulary
COCO_TRAIN_IMAGES = 113_287
GPU_BATCH_IMAGES = RECOMMENDED_BATCH // CAPTIONS_PER_IMAGE  # the GPU recipe's batch


def counts_section(work, settings):
    """Counts of one cross-entropy step of the attention decoder: COCO's vocabulary and caption lengths, the
    course's batch, the bench's encoder grid and widths, cached features. Returns the figures."""
    quick = settings.dims < 512
    vocabulary = 400 if quick else COCO_VOCABULARY
    data = make_coco_sized_data(os.path.join(work, "coco_sized"), work, settings.backbone,
                                settings.train_images if quick else COUNT_TRAIN_IMAGES, 4, settings.image_size,
                                vocabulary)
    trainer = make_trainer(data, work, settings, "attention", run_name="counts")
    try:
        loaded = next(iter(trainer.train_loader))
        trainer.train_step(loaded)  # the optimiser's state is made in the first step
        with OpCounter(trainer_tensors(trainer, loaded)) as counts:
            trainer.train_step(loaded)
    finally:
        trainer.lock.release()
    captions = loaded[2].numel()
    report("step_aten_ops", f"{counts.operations} (one training step of the attention decoder: {captions} captions, "
                            f"vocabulary {vocabulary:,}, {settings.grid} x {settings.grid} grid, widths "
                            f"{settings.dims}; forward, backward and Adam)")
    report("step_computing_ops", f"{counts.computing_operations} (the same without the views: the kernels of an "
                                 f"eager GPU step)")
    report("step_host_syncs", f"{counts.synchronisations}")
    return {"operations": counts.operations, "computing_operations": counts.computing_operations,
            "synchronisations": counts.synchronisations,
            "where_synchronised": counts.where_synchronised, "captions": captions, "vocabulary": vocabulary,
            "batch_size": BATCH_SIZE, "by_operation": dict(counts.by_operation.most_common())}


def graphed_positions(decode_lengths, batches):
    """Positions the graphed recurrence computes per position a caption needs (its words and <end>): in segments
    (each segment's rows for its steps), and as one graph would (every caption for the batch's longest, rounded up
    to a segment). decode_lengths (images, cpi), batches of image indices."""
    padded = COCO_MAX_WORDS + 2  # a caption's padded length (<start>, words, <end>): what a graph runs at most
    segmented = whole = 0
    for batch in batches:
        lengths = sorted(decode_lengths[batch].ravel().tolist(), reverse=True)
        found = segments(lengths, padded)
        segmented += sum(steps * rows for _, steps, rows, _ in found)
        whole += len(lengths) * (found[-1][0] + found[-1][1])
    return segmented / decode_lengths.sum(), whole / decode_lengths.sum()


def graphed_positions_section(images=COCO_TRAIN_IMAGES):
    """Graphed positions per needed position over one COCO-sized epoch (caption lengths as the bench's COCO-sized
    data draws them) at the GPU recipe's batch, in segments and as one graph per batch. Returns the figures."""
    decode_lengths = caption_lengths(images * CAPTIONS_PER_IMAGE, np.random.default_rng(SEED)).reshape(
        images, CAPTIONS_PER_IMAGE) + 1  # (images, cpi): the words and <end>
    order = torch.randperm(images, generator=torch.Generator().manual_seed(SEED)).tolist()
    batches = [order[start:start + GPU_BATCH_IMAGES] for start in range(0, images, GPU_BATCH_IMAGES)]
    segmented, whole = graphed_positions(decode_lengths, batches)
    figures = {"segmented": segmented, "whole_batch": whole, "images": images,
               "batch_captions": GPU_BATCH_IMAGES * CAPTIONS_PER_IMAGE}
    report("graphed_positions_per_position", f"{segmented:.2f} in segments of {SEGMENT_STEPS} steps, {whole:.2f} if "
                                             f"every caption ran for its batch's longest (one COCO-sized epoch of "
                                             f"{images:,} images, batches of {figures['batch_captions']} captions)")
    return figures
