"""What one attention training step asks of the device at COCO's sizes, counted: its aten operations (kernel
launches on a GPU, in eager mode) and its host synchronisations. The counts are the same on every machine, so
bench.py prints them on the CPU too."""
import os

from benchmarks.coco_sized import COCO_VOCABULARY, make_coco_sized_data
from benchmarks.common import BATCH_SIZE, make_trainer, report
from benchmarks.op_counts import OpCounter, trainer_tensors

COUNT_TRAIN_IMAGES = 192  # the fewest images whose captions use every word of COCO's vocabulary


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
