"""The toolkit's entry points and their command line: train, test, caption, compare, cache-features.

From Python: `train(cfg)`, `test(checkpoint)`, `caption(checkpoint, images)`, `compare(checkpoints)`.
From the shell: `python solver.py {train,test,caption,compare,cache-features} --help`.
The training loop is training.py, its steps training_steps.py, the cfg keys config.py.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from beam_search import beam_search
from checkpoints import load_checkpoint
from config import add_cfg_options, pick_device, upgrade_cfg, validate_cfg, with_env_overrides  # noqa: F401 (notebooks)
from datasets import ImageCaptionsDataset, check_data_files, load_references, load_word_map, normalize_images
from features import ensure_feature_cache
from figures import visualize_att
from grounding import caption_grounding
from models import build_decoder
from training import Trainer, build_encoder, default_workers, strip_special, word_map_mismatch
from utils import (ToolkitError, atomic_path, check_writable_file, coco_caption_metrics, course_bleu, format_metrics,
                   results_table, run_cli)


def train(cfg):
    """Train a captioning model as cfg describes; returns the checkpoint paths and the history."""
    return Trainer(validate_cfg(cfg)).run()


def load_models(checkpoint, device):
    """Encoder and decoder of a checkpoint dict, in eval mode on `device`."""
    cfg = checkpoint["cfg"]
    encoder = build_encoder(cfg, weights=None)
    encoder.load_state_dict(checkpoint["encoder_state"])
    decoder = build_decoder(cfg, len(checkpoint["word_map"]), encoder.encoder_dim)
    decoder.load_state_dict(checkpoint["decoder_state"])
    return encoder.to(device).eval(), decoder.to(device).eval()


# ---------------------------------------------------------------- testing and captioning


def load_for_inference(checkpoint_path, device=None):
    """(checkpoint dict, encoder, decoder) on the chosen device, in eval mode."""
    device = pick_device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["cfg"] = upgrade_cfg(checkpoint["cfg"], checkpoint_path)
    encoder, decoder = load_models(checkpoint, device)
    return checkpoint, encoder, decoder


def decode_batch(encoder, decoder, images, word_map, beam_size, max_steps):
    """uint8 images (B, 3, S, S) on the model's device -> list of B Captions."""
    with torch.inference_mode():
        encoder_out = encoder(normalize_images(images))  # (B, G, G, C)
    return beam_search(decoder, encoder_out, word_map["<start>"], word_map["<end>"], beam_size, max_steps)


def test(checkpoint, beam_size=3, split="TEST", predictions_json=None, data_folder=None, batch_size=50,
         max_steps=50, blind=False, device=None, coco_metrics=True, workers=None):
    """Beam search over a split (no teacher forcing); prints and returns the scores.

    Returns a dict with the course's BLEU (`bleu1`..`bleu4`, nltk corpus_bleu against the split's
    captions) and, with coco_metrics, the coco-caption metrics against each image's full original
    references. `blind` replaces every image by a blank one (the language prior alone).
    """
    check_beam_size(beam_size)
    if predictions_json:
        check_writable_file(predictions_json, "predictions_json (--predictions-json)")
    ckpt, encoder, decoder = load_for_inference(checkpoint, device)
    beam_size = clamp_beam_size(beam_size, ckpt["word_map"])
    cfg = ckpt["cfg"]
    data_folder = data_folder or cfg["data_folder"]
    word_map = ckpt["word_map"]
    check_data_files(data_folder, cfg["data_name"], (split,))
    if load_word_map(data_folder, cfg["data_name"]) != word_map:
        raise ToolkitError(word_map_mismatch(checkpoint, data_folder, cfg["data_name"]))
    dataset = ImageCaptionsDataset(data_folder, cfg["data_name"], split)
    workers = default_workers({"workers": workers})
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    device = next(decoder.parameters()).device
    references, hypotheses, decoded = [], [], []
    for images, captions, _ in tqdm(loader, desc=f"beam search {split} (k={beam_size})", unit="batch"):
        images = torch.zeros_like(images) if blind else images
        for caption, image_captions in zip(decode_batch(encoder, decoder, images.to(device), word_map, beam_size,
                                                        max_steps), captions.tolist()):
            references.append([strip_special(c, word_map) for c in image_captions])
            hypotheses.append(strip_special(caption.words, word_map))
            decoded.append(caption)
    scores, unavailable = course_bleu(references, hypotheses), {}
    words = {index: word for word, index in word_map.items()}
    sentences = [" ".join(words[w] for w in hypothesis) for hypothesis in hypotheses]
    refs = load_references(data_folder, cfg["data_name"], split, word_map)
    if coco_metrics:
        if refs.fallback:
            print(f"note: no REFS file for {split}; coco-caption metrics use the sampled encoded captions "
                  f"(re-run create_input_files.py to get the full references)")
        coco = coco_caption_metrics(dict(enumerate(sentences)),
                                    {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs.references)})
        scores.update(coco["scores"])
        unavailable = coco["unavailable"]
    per_image_grounding = [None] * len(decoded)
    if decoder.has_attention and any(refs.objects):  # data with boxes: does attention look at what it names?
        grounding, per_image_grounding = caption_grounding(decoded, words, refs.objects, cfg["encoded_image_size"])
        scores.update({key: value for key, value in grounding.items() if value is not None and key != "object_words"})
    print(f"{split} split, {len(hypotheses)} images, beam size {beam_size}. BLEU-n: the course's nltk corpus_bleu "
          f"against the split's captions; COCO-*: coco-caption against every original reference")
    for line in format_metrics(scores, unavailable):
        print(line)
    if predictions_json:
        with atomic_path(predictions_json) as tmp, open(tmp, "w", encoding="utf-8") as file:
            json.dump([{"image_id": image_id, "caption": sentence, "mass_in_box": mass}
                       for image_id, sentence, mass in zip(refs.image_ids, sentences, per_image_grounding)], file,
                      indent=1)
    return scores


def check_beam_size(beam_size):
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ToolkitError(f"beam_size = {beam_size!r} must be a whole number of at least 1 (--beam-size)")


def clamp_beam_size(beam_size, word_map):
    """Beam search keeps at most one beam per word of the vocabulary."""
    if beam_size > len(word_map):
        print(f"note: beam_size = {beam_size} is larger than the vocabulary ({len(word_map)} words); using "
              f"{len(word_map)}")
        return len(word_map)
    return beam_size


def read_image(path, image_size):
    """An image file -> uint8 tensor (3, S, S), resized like create_input_files does."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ToolkitError(f"cannot read image {path!r}: {error}") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def caption(checkpoint, images, beam_size=3, max_steps=50, device=None):
    """Caption image files. Returns one dict per image: path, caption (str), words, alphas, betas.

    An unreadable image is reported and skipped (its entry has caption None and an error).
    """
    check_beam_size(beam_size)
    ckpt, encoder, decoder = load_for_inference(checkpoint, device)
    word_map = ckpt["word_map"]
    beam_size = clamp_beam_size(beam_size, word_map)
    words = {index: word for word, index in word_map.items()}
    device = next(decoder.parameters()).device
    results = []
    for path in [images] if isinstance(images, str) else images:
        try:
            image = read_image(path, ckpt["image_size"])
        except ToolkitError as error:
            print(f"error: {error}", file=sys.stderr)
            results.append({"path": path, "caption": None, "error": str(error)})
            continue
        result = decode_batch(encoder, decoder, image.unsqueeze(0).to(device), word_map, beam_size, max_steps)[0]
        text = " ".join(words[w] for w in strip_special(result.words, word_map))
        results.append({"path": path, "caption": text, "words": [words[w] for w in result.words],
                        "seq": result.words, "alphas": result.alphas, "betas": result.betas,
                        "grid": ckpt["cfg"]["encoded_image_size"]})
    return results


def caption_figure(checkpoint, image_path, beam_size=3, smooth=True, out=None, device=None):
    """Caption one image and draw the course's figure: per-word attention panels (with beta_t for the
    adaptive decoder), or the image under its caption for the decoder without attention.
    Returns (caption text, matplotlib Figure); writes a PNG when `out` is given."""
    result = caption(checkpoint, [image_path], beam_size, device=device)[0]
    if result["caption"] is None:
        raise ToolkitError(result["error"])
    rev_word_map = dict(zip(result["seq"], result["words"]))
    figure = visualize_att(image_path, result["seq"], result["alphas"], rev_word_map, smooth=smooth, out=out,
                           betas=result["betas"])
    return result["caption"], figure


def compare(checkpoints, beam_size=3, split="TEST", out=None, **test_options):
    """Test several checkpoints and return (and print) a markdown table of all their metrics."""
    results = {}
    for path in checkpoints:
        cfg = upgrade_cfg(load_checkpoint(path)["cfg"], path)
        scores = test(path, beam_size=beam_size, split=split, **test_options)
        label = os.path.basename(path)
        results[label] = dict(scores, decoder=cfg["decoder"], encoder=cfg["encoder"],
                              fine_tuned="yes" if cfg["fine_tune_encoder"] else "no", beam_size=beam_size)
    table = results_table(results)
    print(table)
    if out:
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as file:
            file.write(table + "\n")
    return table


# ---------------------------------------------------------------- command line


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_cfg_options(commands.add_parser("train", help="train a model (cfg keys as options)"))
    test_parser = commands.add_parser("test", help="beam search over a split and print BLEU and coco metrics")
    test_parser.add_argument("--checkpoint", required=True)
    test_parser.add_argument("--beam-size", type=int, default=3)
    test_parser.add_argument("--split", default="TEST", choices=("TRAIN", "VAL", "TEST"))
    test_parser.add_argument("--predictions-json")
    test_parser.add_argument("--data-folder", help="where the data is now, if it moved since training")
    test_parser.add_argument("--blind", action="store_true", help="blank images: what the language prior alone scores")
    caption_parser = commands.add_parser("caption", help="caption image files")
    caption_parser.add_argument("--checkpoint", required=True)
    caption_parser.add_argument("images", nargs="+")
    caption_parser.add_argument("--beam-size", type=int, default=3)
    compare_parser = commands.add_parser("compare", help="a markdown table of the metrics of several checkpoints")
    compare_parser.add_argument("checkpoints", nargs="+")
    compare_parser.add_argument("--beam-size", type=int, default=3)
    compare_parser.add_argument("--split", default="TEST", choices=("TRAIN", "VAL", "TEST"))
    compare_parser.add_argument("--out", help="also write the table to this markdown file")
    cache_parser = commands.add_parser("cache-features", help="build the frozen encoder's feature caches ahead of time")
    add_cfg_options(cache_parser)
    return parser


def cache_features(cfg):
    """Build the TRAIN and VAL feature caches that train(cfg) would use."""
    cfg = validate_cfg(cfg)
    if cfg["fine_tune_encoder"]:
        raise ToolkitError("a fine-tuned encoder changes during training: its features cannot be cached")
    check_data_files(cfg["data_folder"], cfg["data_name"], ("TRAIN", "VAL"))
    encoder = build_encoder(cfg, cfg["encoder_weights"]).to(cfg["device"]).eval()
    workers = default_workers(cfg)
    return [ensure_feature_cache(encoder, cfg["data_folder"], cfg["data_name"], split, cfg["cache_folder"],
                                 cfg["batch_size"], workers, cfg["device"]) for split in ("TRAIN", "VAL")]


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "train":
        train(args)
    elif command == "cache-features":
        for path in cache_features(args):
            print(path)
    elif command == "test":
        test(args["checkpoint"], args["beam_size"], args["split"], args["predictions_json"], args["data_folder"],
             blind=args["blind"])
    elif command == "caption":
        results = caption(args["checkpoint"], args["images"], args["beam_size"])
        for result in results:
            if result["caption"] is not None:
                print(f"{result['path']}: {result['caption']}")
        failed = [result["path"] for result in results if result["caption"] is None]
        if failed:
            raise ToolkitError(f"{len(failed)} of {len(results)} images could not be read: {', '.join(failed)}")
    elif command == "compare":
        compare(args["checkpoints"], args["beam_size"], args["split"], args["out"])


if __name__ == "__main__":
    run_cli(main)
