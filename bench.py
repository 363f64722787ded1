"""Speed of the toolkit's fast paths against the course's code, measured side by side on shapes data.

    python bench.py                  # CPU figures (about 8 minutes on an idle 2 cores)
    python bench.py --quick          # a few seconds per part (small backbone and images): for the tests
    python bench.py --gpu            # the GPU section alone, at COCO's sizes (about 5 minutes on an H100/H200)
    python bench.py --json FILE      # also write every figure as JSON
    python bench.py --backbones      # markdown table of the encoder backbones: C, size, GFLOPs, CPU ms
    python bench.py --ddp            # training in 1 against 2 processes (torchrun, one thread each), all-reduce

The CPU part uses the course's model configuration (ResNet-101 with random weights, 256 x 256 images, 14 x 14 grid,
batch 32, embed/attention/decoder 512) and prints one line per figure; the ratios are `train_speedup_attention`,
`train_speedup_rnn`, `beam_speedup` (with `beam_mismatches`), `encoder_speedup`, `cache_build_speedup` and
`preprocess_speedup`, each with the absolute figures behind it, and the counts `step_aten_ops` and
`step_host_syncs` of one training step at COCO's sizes and `graphed_positions_per_position` (what the CUDA graphs
of the recurrence compute per needed position over a COCO-sized epoch). Every timed part runs the toolkit's own
code (training.Trainer.train_step, beam_search, create_input_files) after a warm-up, in one process, with data
loading in that process too (workers=0), so both sides of a ratio pay for it. The sections live in benchmarks/, one
file each.
"""
import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict

from benchmarks.common import (BATCH_SIZE, BUSY_LOAD, CALIBRATION_IMAGES, CAPTIONS_PER_IMAGE, FULL, QUICK, machine,
                               make_bench_data, report)
from benchmarks.ddp import ddp_section, ddp_worker
from benchmarks.decoders import training_section
from benchmarks.encoder import backbone_table, encoder_section
from benchmarks.gpu import gpu_section
from benchmarks.preprocess import preprocess_section
from benchmarks.step_counts import COCO_TRAIN_IMAGES, counts_section, graphed_positions_section
from utils import atomic_path, run_cli


def report_machine(settings):
    """The first lines: the machine, its load, the sizes; returns the machine's figures."""
    info = machine()
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
    return info


def run_benchmark(settings, data_folder=None):
    """Every CPU section, printed as it goes; returns all figures."""
    started = time.perf_counter()
    figures = {"machine": report_machine(settings), "settings": asdict(settings)}
    with tempfile.TemporaryDirectory(prefix="bench_") as work:
        data = make_bench_data(data_folder or os.path.join(work, "data"), work, settings)
        training_figures, trained_checkpoint = training_section(data, work, settings)
        figures.update(training_figures)
        mismatches = sum(beam["mismatches"] for beam in figures["beam"].values())
        report("beam_mismatches", f"{mismatches}")
        figures["beam_mismatches"] = mismatches
        figures["encoder"] = encoder_section(data, work, settings, figures["feature_cache"], trained_checkpoint)
        figures["preprocess"] = preprocess_section(work, settings)
        figures["counts"] = counts_section(work, settings)
        figures["graphed_positions"] = graphed_positions_section(2_000 if settings.dims < 512 else COCO_TRAIN_IMAGES)
    return finish(figures, started)


def run_gpu(quick):
    """The --gpu section alone; returns its figures."""
    started = time.perf_counter()
    figures = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
        figures["gpu"] = gpu_section(work, quick)
    return finish(figures, started)


def finish(figures, started):
    figures["load_average_at_end"] = os.getloadavg()[0]
    figures["wall_seconds"] = time.perf_counter() - started
    report("load_average_at_end", f"{figures['load_average_at_end']:.2f} (1 min)")
    report("wall_time", f"{figures['wall_seconds']:.0f} s")
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per part: small backbone and images")
    parser.add_argument("--gpu", action="store_true", help="the GPU section alone (with --quick: tiny sizes, on the "
                                                           "CPU when there is no GPU)")
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
    if args.gpu:
        figures = run_gpu(args.quick)
    elif args.ddp:
        figures = ddp_section(settings)
    else:
        figures = run_benchmark(settings, args.data_folder)
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w", encoding="utf-8") as file:
            json.dump(figures, file, indent=1)


if __name__ == "__main__":
    run_cli(main)
