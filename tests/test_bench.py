"""bench.py: the quick run prints every figure in its documented format; the COCO projection, the backbone
table, the step counts and the --gpu section (on the CPU at tiny sizes). Speed ratios are not asserted (timings in
tests are flaky): they belong in docs/benchmarks.md."""
import itertools
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from benchmarks.coco_sized import random_captions
from benchmarks.common import BATCH_SIZE, QUICK, FeatureCache, coco_projection
from benchmarks.encoder import backbone_table
from benchmarks.gpu import GPU_QUICK, cache_build_figures, graph_count, warm_up

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO_LINES = ("train_speedup_attention", "train_speedup_rnn", "beam_speedup", "preprocess_speedup", "encoder_speedup",
               "cache_build_speedup")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """stdout and JSON figures of `python bench.py --quick --json PATH`."""
    json_path = tmp_path_factory.mktemp("bench") / "figures.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--json", str(json_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(json_path, encoding="utf-8") as file:
        return result.stdout, json.load(file)


def line_values(stdout):
    """{name: text} of the `name: text` lines."""
    return dict(line.split(": ", 1) for line in stdout.splitlines() if ": " in line)


def test_quick_run_prints_each_ratio_in_its_exact_format(quick_run):
    stdout, _ = quick_run
    for name in RATIO_LINES:
        assert re.search(rf"^{name}: \d+\.\d{{1,2}} x$", stdout, re.MULTILINE), f"no {name} line in:\n{stdout}"
    assert re.search(r"^beam_mismatches: \d+$", stdout, re.MULTILINE)
    assert stdout.splitlines()[0].startswith("machine: ")
    assert f"torch {torch.__version__}" in stdout.splitlines()[0]


def test_batched_beam_search_gives_the_reference_captions(quick_run):
    stdout, figures = quick_run
    assert line_values(stdout)["beam_mismatches"] == "0"
    assert figures["beam_mismatches"] == 0
    assert {name: beam["mismatches"] for name, beam in figures["beam"].items()} == {"attention": 0, "rnn": 0,
                                                                                   "transformer": 0}
    assert figures["beam"]["attention"]["images"] == QUICK.val_images


def test_json_holds_the_absolute_figures_behind_each_ratio(quick_run):
    stdout, figures = quick_run
    values = line_values(stdout)
    for decoder in ("attention", "rnn"):
        train = figures["train"][decoder]
        assert train["course"]["samples_per_s"] > 0 and train["cached"]["samples_per_s"] > 0
        assert train["speedup"] == pytest.approx(train["cached"]["samples_per_s"] / train["course"]["samples_per_s"])
        assert values[f"train_speedup_{decoder}"] == f"{train['speedup']:.2f} x"
        # grouped batches hold 32 // 5 = 6 images with their 5 captions each; course batches 32 captions
        rounds = QUICK.timing_rounds
        assert train["cached"]["captions"] == rounds * QUICK.cached_steps_per_round * 30
        assert 0 < train["course"]["captions"] <= rounds * 32
    assert values["preprocess_speedup"] == f"{figures['preprocess']['speedup']:.2f} x"
    assert figures["feature_cache"]["images"] == QUICK.train_images + QUICK.val_images
    encoder = figures["encoder"]
    assert values["encoder_speedup"] == f"{encoder['images_per_s'] / encoder['reference_images_per_s']:.2f} x"
    cache_speedup = encoder["cache_build_images_per_s"] / encoder["cache_build_reference_images_per_s"]
    assert values["cache_build_speedup"] == f"{cache_speedup:.2f} x"
    assert encoder["gflops_per_s"] == pytest.approx(encoder["images_per_s"] * encoder["gflops_per_image"])
    assert 0 < encoder["test_images_per_s"] and 0 < encoder["gflops_per_s"] < 10 * encoder["conv_gflops_per_s"]


def test_the_graphed_segments_compute_fewer_positions_than_one_graph_per_batch(quick_run):
    stdout, figures = quick_run
    positions = figures["graphed_positions"]
    assert 1 < positions["segmented"] < positions["whole_batch"] / 2  # COCO-like lengths: most captions fit 16 steps
    assert line_values(stdout)["graphed_positions_per_position"].startswith(f"{positions['segmented']:.2f} in segments")


def test_the_step_counts_are_printed_and_a_training_step_never_synchronises(quick_run):
    stdout, figures = quick_run
    counts = figures["counts"]
    assert line_values(stdout)["step_host_syncs"] == "0" and counts["synchronisations"] == 0
    assert line_values(stdout)["step_aten_ops"].startswith(f"{counts['operations']} (one training step")
    assert counts["by_operation"]["_fused_adam_"] == 1  # one fused optimiser step for every parameter


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU section runs at full size on this machine")
def test_the_gpu_section_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    json_path = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "bench.py", "--gpu", "--quick", "--json", str(json_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(json_path, encoding="utf-8") as file:
        gpu = json.load(file)["gpu"]
    values = line_values(result.stdout)
    assert set(gpu["runs"]) >= {"course_path_fp32_b32", "attention_cache_bf16_b60", "transformer_cache_bf16_b60",
                                "attention_finetuned_fp32_b60"}
    for run in gpu["runs"].values():
        assert run["samples_per_s"] > 0 and run["coco_epoch_minutes"] == pytest.approx(566_435 / run["samples_per_s"] / 60)
    speedup = gpu["runs"]["attention_cache_bf16_b32"]["samples_per_s"] / gpu["runs"]["course_path_fp32_b32"]["samples_per_s"]
    assert values["gpu_speedup_over_course_b32"] == f"{speedup:.2f} x"
    assert gpu["profile"]["step_seconds"] > 0 and gpu["scst"]["samples"] > 0
    assert gpu["test"]["images"] == GPU_QUICK.val_images and gpu["encoder"]["toolkit"] > 0
    assert gpu["cache_build"]["split_images"] == [GPU_QUICK.train_images, GPU_QUICK.val_images]


def test_coco_sized_captions_use_every_word_at_coco_lengths():
    captions = random_captions(200, 9490, np.random.default_rng(0), every_word=True)
    words = [word for image in captions for caption in image for word in caption]
    lengths = [len(caption) for image in captions for caption in image]
    assert len(captions) == 200 and all(len(image) == 5 for image in captions)
    assert len(set(words)) == 9490
    assert 10 <= np.mean(lengths) <= 11 and max(lengths) <= 50 and min(lengths) >= 8


def test_coco_projection_from_given_rates():
    # 113,287 images x 5 captions at 100 samples/s; 118,287 TRAIN + VAL images cached at 50 images/s
    projection = coco_projection(100.0, cache_images_per_second=50.0)
    assert projection["epoch_hours"] == pytest.approx(566_435 / 100 / 3600)  # 1.573 h
    assert projection["cache_hours"] == pytest.approx(118_287 / 50 / 3600)  # 0.657 h
    assert coco_projection(566_435 / 3600)["epoch_hours"] == pytest.approx(1.0)
    assert coco_projection(100.0)["cache_hours"] is None


def test_backbone_table_has_a_row_per_backbone():
    table = backbone_table(image_size=64, encoded_image_size=2, backbones=("resnet18",))
    header, rule, row = table.splitlines()
    assert header == "| backbone | C | parameters (M) | GFLOPs | CPU ms |"
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["resnet18", "512", "11.2"]  # the trunk without fc: 11.18 M parameters
    # ResNet-18 costs 1.82 GFLOPs (multiply-add = 2) at 224 x 224; at 64 x 64 it scales with the pixels
    assert float(cells[3]) == pytest.approx(1.82 * 2 * (64 / 224) ** 2, rel=0.1)


def test_the_scst_step_and_its_reward_share_are_measured(quick_run):
    stdout, figures = quick_run
    values = line_values(stdout)
    scst = figures["scst"]
    assert scst["samples"] == QUICK.scst_steps * (BATCH_SIZE // 5) * 5
    assert values["scst_samples_per_s"].startswith(f"{scst['samples_per_s']:.2f} sampled captions/s")
    assert 0 < scst["reward_share"] < 1
    assert values["cider_reward_share"].startswith(f"{scst['reward_share']:.4f} of the SCST step")


def test_the_transformer_is_measured(quick_run):
    stdout, figures = quick_run
    values = line_values(stdout)
    transformer = figures["transformer"]
    assert values["train_samples_per_s_transformer"].startswith(f"{transformer['train_samples_per_s']:.2f} samples/s")
    assert re.search(r"^beam_speedup_transformer: \d+\.\d{1,2} x$", stdout, re.MULTILINE)
    incremental = transformer["incremental"]
    assert incremental["ratio"] == pytest.approx(incremental["recomputed_seconds"] / incremental["cached_seconds"])
    assert f"({incremental['ratio']:.2f} x)" in values["transformer_incremental_step"]


def test_backbone_table_counts_the_attention_projections_of_clip_vit():
    """ViT-B/16 at 224 x 224: 17.6 G multiply-adds, 35.1 GFLOPs, with nn.MultiheadAttention's projections, which
    the counter misses on the CPU's inference fast path (22.5)."""
    from benchmarks.encoder import _meta_gflops

    assert _meta_gflops(14, "clip_vit_b16", 224) == pytest.approx(35.1, abs=0.1)


def test_the_options_study_table_gives_each_variants_mean_and_seeds():
    from benchmarks.options_study import table
    rows = {"plain": {0: {"bleu4": 0.5, "cider": 4.0}, 1: {"bleu4": 0.7, "cider": 5.0}},
            "ensemble": {"ensemble": {"bleu4": 0.65, "cider": 4.25}}}
    lines = table(rows).splitlines()
    assert lines[2] == "| plain | 0.6000 | 4.5000 | 0.5000, 0.7000 | 4.0000, 5.0000 |"
    assert lines[3] == "| ensemble | 0.6500 | 4.2500 | 0.6500 | 4.2500 |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for minutes")
def test_the_gpu_check_script_writes_each_part_under_out(tmp_path):
    """benchmarks/gpu_check.sh on a machine without CUDA: its parts run (the CUDA tests skipped, the --gpu section
    says it is skipped) and each writes its file under $OUT."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OUT=str(out), PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"torch {torch.__version__}" in (out / "machine.txt").read_text()
    tests = (out / "test_on_cuda.txt").read_text()
    assert re.search(r"\d+ skipped", tests) and "exit status 0" in tests
    bench = (out / "bench.txt").read_text()
    assert "gpu: skipped" in bench and "exit status 0" in bench
    assert "gpu" in json.loads((out / "bench.json").read_text())


def test_the_cache_build_rate_past_start_up_is_the_extra_images_over_the_extra_seconds():
    # 0.5 s of start-up a build, then 2,048 images/s: TRAIN 2,048 images in 1.5 s, VAL 1,024 in 1.0 s
    cache = FeatureCache(("train.hdf5", "val.hdf5"), (0, 0), (2048, 1024), (1.5, 1.0))
    figures = cache_build_figures(cache, encoder_rate=4096.0)
    assert figures["images"] == 3072 and figures["images_per_s"] == pytest.approx(3072 / 2.5)
    assert figures["images_per_s_past_start"] == pytest.approx(2048) and figures["start_seconds"] == pytest.approx(0.5)
    noisy = cache_build_figures(FeatureCache(("t", "v"), (0, 0), (2048, 1024), (1.0, 1.2)), encoder_rate=4096.0)
    assert noisy["images_per_s_past_start"] is None and noisy["start_seconds"] is None


def test_the_warm_up_runs_until_enough_steps_in_a_row_capture_no_graph():
    """A decoder that captures a graph at steps 1, 2 and 5 (counting from 1): with 3 quiet steps wanted, the
    warm-up stops after step 8 (two quiet steps, then a capture, then three); with at most 4 steps, after 4."""
    captured_at = {1, 2, 5}
    graphs = types.SimpleNamespace(graphs={})
    trainer = types.SimpleNamespace(decoder_module=types.SimpleNamespace(training_graphs=graphs))

    def steps():
        for step in itertools.count(1):
            if step in captured_at:
                graphs.graphs[step] = None
            yield BATCH_SIZE, None

    assert warm_up(steps(), trainer, quiet_steps=3) == 8 and len(graphs.graphs) == 3
    graphs.graphs.clear()
    assert warm_up(steps(), trainer, quiet_steps=3, most_steps=4) == 4
    trainer.decoder_module.training_graphs = None  # no graphs: the quiet steps alone
    assert warm_up(steps(), trainer, quiet_steps=3) == 3 and graph_count(trainer) == 0
