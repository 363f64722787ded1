"""The toolkit's entry points and their command line: train, test, caption, compare, cache-features, import-course.

From Python: `train(cfg)`, `test(checkpoint)`, `caption(checkpoint, images)`, `compare(checkpoints)`; to caption
many pictures with one load, captioner.Captioner.
From the shell: `python solver.py {train,test,caption,compare,cache-features,import-course} --help`.
The training loop is training.py, its stages training_stages.py, the cfg keys config.py.
"""
import argparse
import inspect
import json
import os

import torch
from tqdm.auto import tqdm

from beam_search import check_search_options
from captioner import Captioner, check_beam_size, check_whole_number, clamp_beam_size, expand_folders, result_figure
from chair import NO_OBJECT_LISTS, caption_chair, image_objects
from checkpoints import check_checkpoint, load_checkpoint
from clip_score import DEFAULT_CLIP_MODEL, clip_scores, parse_model
from coco_results import check_coco_results, write_coco_results
from config import add_cfg_options, upgrade_cfg, validate_cfg, with_env_overrides  # noqa: F401 (notebooks)
from datasets import ImageCaptionsDataset, check_data_files, load_references, load_word_map
from features import ensure_feature_cache
from grounding import caption_grounding
from loaders import default_workers
from metrics import TOKENIZERS, check_tokenizer, coco_caption_metrics, course_bleu, format_metrics, results_table
from models import build_encoder
from run_start import word_map_mismatch
from training import Trainer
from utils import ToolkitError, atomic_path, check_writable_file, check_writable_folder, loader_worker_init, run_cli
from vocabulary import strip_special


def train(cfg):
    """Train a captioning model as cfg describes; returns the checkpoint paths and the history."""
    return Trainer(validate_cfg(cfg)).run()


def check_inference_options(beam_size, batch_size, max_steps, workers=None, length_penalty=0.0, block_trigrams=False,
                            n_best=1):
    """The options test, caption and compare take, refused before any work as the cfg's are (validate_cfg)."""
    check_beam_size(beam_size)
    check_search_options(beam_size, length_penalty, block_trigrams, n_best)
    check_whole_number("batch_size", batch_size)
    check_whole_number("max_steps", max_steps)
    if workers is not None:
        check_whole_number("workers", workers, least=0)


def inference_workers(workers, device):
    """DataLoader workers of an encoder pass: None -> none on the CPU, where the encoder's threads need every
    core and reading the uint8 images is a small part of the time; min(4, cores) on CUDA."""
    if workers is None and torch.device(device).type == "cpu":
        return 0
    return default_workers({"workers": workers})


def checkpoint_paths(checkpoint):
    """test's and caption's checkpoint: one path, or a list of them (an ensemble) -> a list of paths."""
    return [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)


def test(checkpoint, beam_size=3, split="TEST", predictions_json=None, data_folder=None, batch_size=50,
         max_steps=50, blind=False, device=None, coco_metrics=True, workers=None, length_penalty=0.0,
         block_trigrams=False, n_best=1, tokenizer=None, clip_metric_model=DEFAULT_CLIP_MODEL, instances=None):
    """Beam search over a split (no teacher forcing); prints and returns the scores. `checkpoint`: a path, or a list
    of paths: their ensemble (Captioner.from_checkpoints), testing on the first one's data.

    Returns a dict with the course's BLEU (`bleu1`..`bleu4`, nltk corpus_bleu against the split's
    captions) and, with coco_metrics, the coco-caption metrics against each image's full original
    references, tokenised by coco-caption's PTB tokenizer: `tokenizer` "java" (pycocoevalcap's), "python"
    (ptb_tokenizer.py, the same tokens) or None (java when it runs, else python); the scores say which ran
    (`ptb_tokenizer`); and CLIP-S and RefCLIP-S (clip_score.py) by `clip_metric_model` ("<open_clip
    model>:<tag or file>") when its weights are at hand (a local file or Hugging Face's cache; else a note says
    why they are skipped); and the object hallucination rates CHAIR-i and CHAIR-s (`chair_i`, `chair_s`,
    chair.py) where the data lists each image's objects (shapes data; COCO with `instances`, COCO's
    instances_*.json).
    `blind` replaces every image by a black one: what this model says about an image with nothing in it (not a
    language prior: a model never trained on such images; the demo's blind control is trained on them).
    length_penalty and block_trigrams change the search (beam_search.py); the best caption is scored, and with
    n_best > 1 predictions_json also holds each image's n_best captions with their scores.
    """
    check_inference_options(beam_size, batch_size, max_steps, workers, length_penalty, block_trigrams, n_best)
    if coco_metrics:
        check_tokenizer(tokenizer)
    if predictions_json:
        check_writable_file(predictions_json, "predictions_json (--predictions-json)")
    if coco_metrics and clip_metric_model:
        parse_model(clip_metric_model)
    paths = checkpoint_paths(checkpoint)
    captioner = Captioner.from_checkpoints(paths, device)
    word_map, cfg = captioner.word_map, captioner.cfg
    beam_size = clamp_beam_size(beam_size, word_map)
    data_folder = data_folder or cfg["data_folder"]
    check_data_files(data_folder, cfg["data_name"], (split,))
    if load_word_map(data_folder, cfg["data_name"]) != word_map:
        raise ToolkitError(word_map_mismatch(paths[0], data_folder, cfg["data_name"]))
    refs = load_references(data_folder, cfg["data_name"], split, word_map)
    object_lists = image_objects(refs, instances)  # before the beam search: a bad instances file fails first
    dataset = ImageCaptionsDataset(data_folder, cfg["data_name"], split)
    workers = inference_workers(workers, captioner.device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         worker_init_fn=loader_worker_init if workers > 0 else None)
    references, hypotheses, ranked = [], [], []  # ranked: per image, its n_best Captions
    for images, captions, _ in tqdm(loader, desc=f"beam search {split} (k={beam_size})", unit="batch"):
        images = torch.zeros_like(images) if blind else images
        found = captioner.decode(captioner.encode(images, min(batch_size, len(dataset))), beam_size, max_steps,
                                 length_penalty, block_trigrams, n_best)
        for image_found, image_captions in zip(found, captions.tolist()):
            references.append([strip_special(c, word_map) for c in image_captions])
            hypotheses.append(strip_special(image_found[0].words, word_map))
            ranked.append(image_found)
    scores, unavailable = course_bleu(references, hypotheses), {}
    words = {index: word for word, index in word_map.items()}
    captions = [[words[w] for w in hypothesis] for hypothesis in hypotheses]
    sentences = [" ".join(caption) for caption in captions]
    if coco_metrics:
        if refs.fallback:
            print(f"note: no REFS file for {split}; coco-caption metrics use the sampled encoded captions "
                  f"(re-run create_input_files.py to get the full references)")
        reference_sentences = [[" ".join(r) for r in rs] for rs in refs.references]
        coco = coco_caption_metrics(dict(enumerate(sentences)), dict(enumerate(reference_sentences)), tokenizer)
        scores.update(coco["scores"], ptb_tokenizer=coco["tokenizer"])
        unavailable.update(coco["unavailable"])
        if clip_metric_model:  # the real images, also in a blind test: how well its captions fit them
            clip = clip_scores(clip_metric_model, (images for images, _, _ in loader), sentences, reference_sentences,
                               captioner.device)
            scores.update(clip["scores"])
            unavailable.update(clip["unavailable"])
    decoded = [image_found[0] for image_found in ranked]
    per_image_grounding = [None] * len(decoded)
    if captioner.decoder.has_attention and any(refs.objects):  # data with boxes: does attention look at what it names?
        grounding, per_image_grounding = caption_grounding(decoded, words, refs.objects, cfg["encoded_image_size"])
        scores.update({key: value for key, value in grounding.items() if value is not None and key != "object_words"})
    chair, hallucinated = caption_chair(captions, object_lists)
    scores.update(chair)
    if object_lists is None:
        unavailable["chair"] = NO_OBJECT_LISTS
    print(f"{split} split, {len(hypotheses)} images, beam size {beam_size}. BLEU-n: the course's nltk corpus_bleu "
          f"against the split's captions; COCO-*: coco-caption against every original reference; CHAIR-i, CHAIR-s: "
          f"object hallucination, lower is better")
    for line in format_metrics(scores, unavailable):
        print(line)
    if predictions_json:
        predictions = [{"image_id": image_id, "caption": sentence, "mass_in_box": mass, "hallucinated": objects}
                       for image_id, sentence, mass, objects in zip(refs.image_ids, sentences, per_image_grounding,
                                                                    hallucinated)]
        if n_best > 1:
            for prediction, image_found in zip(predictions, ranked):
                prediction["n_best"] = n_best_json(captioner.n_best_fields(image_found))
        with atomic_path(predictions_json) as tmp, open(tmp, "w", encoding="utf-8") as file:
            json.dump(predictions, file, indent=1)
    return scores


def n_best_json(fields):
    """An image's n best captions as written to JSON: [{caption, score, ranking_score}], best first."""
    return [{key: entry[key] for key in ("caption", "score", "ranking_score")} for entry in fields]


def caption(checkpoint, images, beam_size=3, max_steps=50, batch_size=50, device=None, output=None, figures=None,
            smooth=True, length_penalty=0.0, block_trigrams=False, n_best=1, coco_results=None):
    """Caption image files (a folder stands for its image files) with a checkpoint, or with the ensemble of a list of
    them (Captioner.from_checkpoints). Returns Captioner.caption's dicts: path,
    caption (str), words, seq, score, alphas, betas, grid, n_best; an unreadable image is reported and gets
    caption None and an error. `output`: also write JSON lines {"file", "caption", "score"} (with n_best > 1 also
    "n_best", the n best with their scores); `figures`: a folder for each image's attention figure (<name>.png);
    `coco_results`: the COCO evaluation server's JSON [{"image_id", "caption"}] (file names
    COCO_val2014_<id>.jpg; see coco_results.py). length_penalty and block_trigrams change the search
    (beam_search.py)."""
    check_inference_options(beam_size, batch_size, max_steps, length_penalty=length_penalty,
                            block_trigrams=block_trigrams, n_best=n_best)
    if output:
        check_writable_file(output, "output (--output)")
    if figures:
        check_writable_folder(figures, "figures (--figures)")
    sources = expand_folders(images)  # once: the files checked are the files captioned
    if coco_results:
        check_writable_file(coco_results, "coco_results (--coco-results)")
        check_coco_results(coco_results, sources)
    results = Captioner.from_checkpoints(checkpoint_paths(checkpoint), device).caption(
        sources, beam_size, max_steps, batch_size, length_penalty, block_trigrams, n_best)
    if output:
        write_json_lines(output, results, n_best)
    if figures:
        write_figures(figures, results, smooth)
    if coco_results:
        write_coco_results(coco_results, results)
    return results


def write_json_lines(path, results, n_best=1):
    """One line per result, {"file", "caption", "score"} (and "error" for an image that could not be read; with
    n_best > 1, "n_best" for one that was captioned)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        for result in results:
            line = {"file": result["path"], "caption": result["caption"], "score": result.get("score")}
            if result["error"]:
                line["error"] = result["error"]
            elif n_best > 1:
                line["n_best"] = n_best_json(result["n_best"])
            file.write(json.dumps(line) + "\n")


def write_figures(folder, results, smooth=True):
    """The attention figure of every captioned image file as folder/<file name>.png (made unique)."""
    taken = set()
    for result in results:
        if result["caption"] is None or result["path"] is None:
            continue
        stem = os.path.splitext(os.path.basename(result["path"]))[0]
        name, copy = stem, 1
        while name in taken:
            copy += 1
            name = f"{stem}_{copy}"
        taken.add(name)
        result_figure(result, smooth=smooth, out=os.path.join(folder, name + ".png"))


def caption_figure(checkpoint, image_path, beam_size=3, smooth=True, out=None, device=None):
    """Caption one image and draw the course's figure: per-word attention panels (with beta_t for the
    adaptive decoder), or the image under its caption for the decoder without attention.
    Returns (caption text, matplotlib Figure); writes a PNG when `out` is given."""
    result = Captioner.from_checkpoint(checkpoint, device).caption([image_path], beam_size)[0]
    return result["caption"], result_figure(result, smooth=smooth, out=out)


def compare(checkpoints, beam_size=3, split="TEST", out=None, **test_options):
    """Test several checkpoints and return (and print) a markdown table of all their metrics (one row each,
    labelled by file name, with as many parent folders as it takes to tell them apart)."""
    check_inference_options(beam_size, test_options.get("batch_size", 50), test_options.get("max_steps", 50),
                            test_options.get("workers"), test_options.get("length_penalty", 0.0),
                            test_options.get("block_trigrams", False))
    if out:
        check_writable_file(out, "out (--out)")
    cfgs = [check_checkpoint(load_checkpoint(path), path)["cfg"] for path in checkpoints]  # all, before any work
    results = {}
    for path, label, cfg in zip(checkpoints, checkpoint_labels(checkpoints), cfgs):
        scores = test(path, beam_size=beam_size, split=split, **test_options)
        results[label] = dict(scores, decoder=cfg["decoder"], encoder=cfg["encoder"],
                              fine_tuned="yes" if cfg["fine_tune_encoder"] else "no", beam_size=beam_size)
    table = results_table(results)
    print(table)
    if out:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as file:
            file.write(table + "\n")
    return table


def checkpoint_labels(paths):
    """A distinct label per path: its file name, with parent folders added where names collide (a path given
    twice is numbered)."""
    parts = [os.path.normpath(os.path.abspath(os.fspath(path))).split(os.sep) for path in paths]
    depths = [1] * len(paths)
    while True:
        labels = ["/".join(p[-depth:]) for p, depth in zip(parts, depths)]
        clashing = [i for i, label in enumerate(labels) if depths[i] < len(parts[i]) and any(
            other == label and parts[j] != parts[i] for j, other in enumerate(labels))]
        if not clashing:
            break
        for i in clashing:
            depths[i] += 1
    seen = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    return labels


# ---------------------------------------------------------------- command line

# The options of test, caption, compare and import-course are made from the functions' signatures: every
# keyword is an option (dashes for underscores, --x/--no-x for booleans), with its help text here.
OPTION_HELP = {
    "checkpoint": "a checkpoint written by training (or by import-course); several (test: --checkpoint A B; caption: "
                  "--checkpoint A --checkpoint B): their ensemble, which takes the log of the models' mean word "
                  "probability at every step (their word maps must be equal)",
    "checkpoints": "the checkpoints to test side by side",
    "images": "image files, or folders of them",
    "beam_size": "beam width of the beam search",
    "split": "the split to decode",
    "predictions_json": "also write [{image_id, caption, mass_in_box, hallucinated}] to this JSON file",
    "length_penalty": "alpha of GNMT's length normalisation of the complete captions' ranking: log-probability / "
                      "((5 + length) / 6) ** alpha; 0: the total log-probability",
    "block_trigrams": "a beam may not write a trigram it has already written",
    "n_best": "the n best captions of each image, with their scores, in the JSON written (at most the beam size)",
    "data_folder": "where the data is now, if it moved since training",
    "batch_size": "images per batch of the encoder and the beam search",
    "max_steps": "longest caption, in words, before the beam search stops",
    "blind": "black images: what the model says about an image with nothing in it",
    "device": "cpu, cuda, cuda:1...; None: cuda when available",
    "coco_metrics": "also score with coco-caption (METEOR, ROUGE-L, CIDEr-D...) and CLIP-S / RefCLIP-S",
    "tokenizer": "coco-caption's PTB tokenizer: java (pycocoevalcap's Stanford CoreNLP) or python (ptb_tokenizer.py, "
                 "the same tokens); None: java when Java runs, else python",
    "clip_metric_model": "the CLIP model of CLIP-S and RefCLIP-S, <open_clip model>:<pretrained tag or state_dict "
                         "file> (weights from the file or Hugging Face's cache, never downloaded at test time)",
    "workers": "DataLoader worker processes; None: 0 on the CPU (the encoder needs its cores), min(4, cores) on CUDA",
    "output": "write JSON lines {file, caption, score} to this file",
    "figures": "write the attention figure of every image into this folder",
    "smooth": "blur the upsampled attention maps of the figures, as the course does",
    "coco_results": "write the COCO evaluation server's JSON [{image_id, caption}] to this file, named "
                    "captions_val2014_<alg>_results.json or captions_test2014_<alg>_results.json (image ids from "
                    "COCO file names, COCO_val2014_000000123456.jpg)",
    "out": "also write the result to this file (import-course: where to write the import; None: "
           "<name>.toolkit.pth.tar beside the course's checkpoint)",
    "path": "the course's checkpoint (a pickled one, or the state_dicts the export lines of docs/course-checkpoints.md write)",
    "data_name": "base name of the data files, e.g. coco_5_cap_per_img_5_min_word_freq",
    "trust_pickle": "load a pickled course checkpoint (this runs code from the file: only for files you trust)",
    "encoded_image_size": "side of the encoder's output grid; None: the one the course's encoder used",
    "instances": "COCO's instances_*.json (e.g. instances_val2014.json): the objects for CHAIR on COCO data",
}
OPTION_TYPES = {"workers": int, "encoded_image_size": int}  # of the keywords whose default is None (else str)
OPTION_CHOICES = {"split": ("TRAIN", "VAL", "TEST"), "tokenizer": TOKENIZERS}
POSITIONAL = {"images": "IMAGE", "checkpoints": "CHECKPOINT", "path": "CHECKPOINT"}  # name -> metavar
VARIADIC = ("images", "checkpoints")  # positional arguments taking one or more values
# required options taking one or more values, a list: after one flag, or with the flag repeated where a variadic
# positional argument would swallow the values after the first
SEVERAL = ("checkpoint",)


PASSED_ON_SKIP = ("checkpoint", "predictions_json", "n_best")  # test's keywords that compare does not pass on


def function_parameters(function, extra=None):
    """The named parameters of `function`, then those of `extra` it passes on through **kwargs."""
    parameters = [p for p in inspect.signature(function).parameters.values() if p.kind != p.VAR_KEYWORD]
    if extra is not None:
        names = {p.name for p in parameters} | set(PASSED_ON_SKIP)
        parameters += [p for p in inspect.signature(extra).parameters.values() if p.name not in names]
    return parameters


def add_function_options(parser, function, extra=None):
    """One argument per parameter of `function` (and of `extra`, see function_parameters)."""
    parameters = function_parameters(function, extra)
    repeated = any(parameter.name in VARIADIC for parameter in parameters)
    for parameter in parameters:
        name, default, meaning = parameter.name, parameter.default, OPTION_HELP[parameter.name]
        if name in POSITIONAL:
            parser.add_argument(name, nargs="+" if name in VARIADIC else None, metavar=POSITIONAL[name], help=meaning)
        elif default is inspect.Parameter.empty:
            several = ({} if name not in SEVERAL else {"action": "append"} if repeated else
                       {"action": "extend", "nargs": "+"})
            parser.add_argument("--" + name.replace("_", "-"), dest=name, required=True, default=argparse.SUPPRESS,
                                help=meaning, **several)
        elif isinstance(default, bool):
            parser.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=meaning)
        else:
            kind = OPTION_TYPES.get(name, str) if default is None else type(default)
            parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default,
                                choices=OPTION_CHOICES.get(name), help=meaning)


def function_commands():
    """subcommand -> (function it calls, function whose keywords it passes on, help)."""
    from course_import import import_course_checkpoint

    return {"test": (test, None, "beam search over a split and print BLEU and coco metrics"),
            "caption": (caption, None, "caption image files (and the files in folders)"),
            "compare": (compare, test, "a markdown table of the metrics of several checkpoints"),
            "import-course": (import_course_checkpoint, None, "turn a checkpoint of the course's train.py into one "
                                                              "of this toolkit")}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_cfg_options(commands.add_parser("train", help="train a model (cfg keys as options)"))
    add_cfg_options(commands.add_parser("cache-features", help="build the frozen encoder's feature caches ahead of "
                                                               "time (cfg keys as options)"))
    for command, (function, extra, meaning) in function_commands().items():
        subparser = commands.add_parser(command, help=meaning, description=meaning,
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_function_options(subparser, function, extra)
    return parser


def cache_features(cfg):
    """Build the TRAIN and VAL feature caches that train(cfg) would use."""
    cfg = validate_cfg(cfg)
    if cfg["fine_tune_encoder"]:
        raise ToolkitError("a fine-tuned encoder changes during training: its features cannot be cached")
    check_data_files(cfg["data_folder"], cfg["data_name"], ("TRAIN", "VAL"))
    encoder = build_encoder(cfg, cfg["encoder_weights"]).to(cfg["device"]).eval()
    workers = inference_workers(cfg["workers"], cfg["device"])
    return [ensure_feature_cache(encoder, cfg["data_folder"], cfg["data_name"], split, cfg["cache_folder"],
                                 cfg["batch_size"], workers, cfg["device"]) for split in ("TRAIN", "VAL")]


def print_captions(results):
    """`path: caption` per captioned image; a ToolkitError naming the images that could not be read."""
    for result in results:
        if result["caption"] is not None:
            print(f"{result['path']}: {result['caption']}")
    failed = [result["path"] for result in results if result["caption"] is None]
    if failed:
        raise ToolkitError(f"{len(failed)} of {len(results)} images could not be read: {', '.join(failed)}")


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "train":
        train(args)
    elif command == "cache-features":
        for path in cache_features(args):
            print(path)
    else:
        function = function_commands()[command][0]
        result = function(**args)
        if command == "caption":
            print_captions(result)
        elif command == "import-course":
            print(result)


if __name__ == "__main__":
    run_cli(main)
