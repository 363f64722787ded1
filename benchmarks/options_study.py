"""Do self-critical.pytorch's training and decoding options help on the demo's data? The attention decoder with the
demo's settings at 192 px with a 6 x 6 grid (STUDY_SETTINGS: those docs/coco.md's figures were measured with),
trained with three seeds, each variant against its plain counterpart:

    python -m benchmarks.options_study OUTPUT_FOLDER      # about 20 minutes on an idle 2-core CPU

- label smoothing 0.1 against none;
- scheduled sampling (from epoch 1, +0.05 every epoch, at most 0.25) against none;
- beam 3 with a length penalty of 0.7 and trigram blocking against plain beam 3 (the plain models);
- the ensemble of the three plain seeds against each seed alone.

Prints a markdown table of test BLEU-4 and CIDEr-D (mean and each seed) and writes it, with every figure, to
OUTPUT_FOLDER/options_study.{md,json}. The shapes data is the demo's (made once, in OUTPUT_FOLDER/shapes_data).
"""
import argparse
import dataclasses
import os
import statistics

import demo
import solver
from utils import run_cli

STUDY_SETTINGS = dataclasses.replace(demo.FULL, image_size=192, encoded_image_size=6)

SEEDS = (0, 1, 2)
VARIANTS = {  # name -> cfg keys of its training
    "plain": {},
    "label_smoothing_0.1": {"label_smoothing": 0.1},
    "scheduled_sampling": {"scheduled_sampling_start": 1, "scheduled_sampling_increase_every": 1,
                           "scheduled_sampling_increase_prob": 0.05, "scheduled_sampling_max_prob": 0.25},
}
BETTER_SEARCH = {"length_penalty": 0.7, "block_trigrams": True}


def train_variants(folder, settings, data):
    """{(variant, seed): best checkpoint} of every training run; runs recorded in OUTPUT_FOLDER/trained.json by
    an earlier call (finished, so their checkpoints are complete) are not trained again."""
    record = os.path.join(folder, "trained.json")
    trained = demo.read_json(record) or {}
    run = demo.RUNS["attention"]
    for variant, options in VARIANTS.items():
        for seed in SEEDS:
            name = f"{variant}_seed{seed}"
            if name not in trained:
                cfg = demo.run_cfg(settings, data, run, os.path.join(folder, "checkpoints"), "cpu")
                cfg.update(options, seed=seed, run_name=name)
                trained[name] = solver.train(cfg)["best_checkpoint"]
                demo.write_json(record, trained)
    return {(variant, seed): trained[f"{variant}_seed{seed}"] for variant in VARIANTS for seed in SEEDS}


def test_scores(checkpoint, **options):
    """(BLEU-4, CIDEr-D) on the demo's TEST split with beam 3."""
    scores = solver.test(checkpoint, demo.BEAM_SIZE, coco_metrics=True, device="cpu", **options)
    return {"bleu4": scores["bleu4"], "cider": scores["cider"]}


def study(folder):
    """Every figure: {row: {seed or 'ensemble': scores}}."""
    settings = STUDY_SETTINGS
    data = demo.prepare_data(os.path.join(folder, demo.DATA_FOLDER), settings)
    checkpoints = train_variants(folder, settings, data)
    rows = {variant: {seed: test_scores(checkpoints[variant, seed]) for seed in SEEDS} for variant in VARIANTS}
    rows["plain, length penalty 0.7 + trigram blocking"] = {
        seed: test_scores(checkpoints["plain", seed], **BETTER_SEARCH) for seed in SEEDS}
    rows["ensemble of the 3 plain seeds"] = {
        "ensemble": test_scores([checkpoints["plain", seed] for seed in SEEDS])}
    return rows


def table(rows):
    """Markdown: one row per variant, the mean and each seed's BLEU-4 and CIDEr-D."""
    lines = ["| variant | BLEU-4 mean | CIDEr-D mean | BLEU-4 by seed | CIDEr-D by seed |",
             "| --- | ---: | ---: | --- | --- |"]
    for name, by_seed in rows.items():
        bleu = [scores["bleu4"] for scores in by_seed.values()]
        cider = [scores["cider"] for scores in by_seed.values()]
        lines.append(f"| {name} | {statistics.mean(bleu):.4f} | {statistics.mean(cider):.4f} | "
                     f"{', '.join(f'{value:.4f}' for value in bleu)} | {', '.join(f'{value:.4f}' for value in cider)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_folder")
    folder = parser.parse_args(argv).output_folder
    os.makedirs(folder, exist_ok=True)
    rows = study(folder)
    text = table(rows)
    print(text)
    demo.write_text(os.path.join(folder, "options_study.md"), text + "\n")
    demo.write_json(os.path.join(folder, "options_study.json"),
                    {name: {str(key): value for key, value in by_seed.items()} for name, by_seed in rows.items()})


if __name__ == "__main__":
    run_cli(main)
