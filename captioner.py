"""Captioning pictures with a trained model: load the checkpoint once, then caption any number of images.

    captioner = Captioner.from_checkpoint("checkpoints/BEST_checkpoint_<run>.pth.tar")
    for result in captioner.caption(["photo1.jpg", "photos/"]):
        print(result["path"], result["caption"])

Captioner.from_checkpoints([path, ...]) loads several checkpoints as one ensemble (ensemble.py): each model encodes
the images at its own image size into its own grid, and their decoders search together.

Images are file paths (a folder stands for the image files in it), PIL images or uint8 tensors (3, H, W);
they are batched through the encoder (with the device's plan, see encoding.py) and the batched beam
search. An image that cannot be read is reported and gets caption None; the others are captioned.
"""
import os
import stat
import sys

import torch
from PIL import Image
from torch.utils.data import default_collate

from beam_search import beam_search, check_search_options
from checkpoints import check_checkpoint, load_checkpoint
from config import pick_device
from encoding import encode_images, inference_plan
from ensemble import Ensemble, check_word_maps
from figures import visualize_att
from models import build_decoder, build_encoder, uninitialised
from images import load_image_tensor as read_image  # the loader preprocessing uses
from utils import ToolkitError, error_summary
from vocabulary import strip_special

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_models(checkpoint, device, source="the checkpoint"):
    """Encoder and decoder of a checkpoint dict (checked by check_checkpoint), in eval mode on `device` (built
    without a random initialisation that the checkpoint's weights would overwrite)."""
    cfg = checkpoint["cfg"]
    encoder = uninitialised(lambda: build_encoder(cfg, weights=None), device)
    load_state(encoder, checkpoint["encoder_state"], "encoder_state", source)
    decoder = uninitialised(lambda: build_decoder(cfg, len(checkpoint["word_map"]), encoder.encoder_dim), device)
    load_state(decoder, checkpoint["decoder_state"], "decoder_state", source)
    return encoder.eval(), decoder.eval()


def load_state(model, state, key, source):
    """model.load_state_dict(state); weights that do not fit the model the cfg describes are a ToolkitError."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        details = " ".join(error_summary(error, 300).split())
        raise ToolkitError(f"{source!r}: its {key} does not fit the {type(model).__name__} its cfg describes "
                           f"({details}); the cfg or the weights were edited after training wrote the file. Use "
                           f"the checkpoint that training (or import-course) wrote") from None


def load_for_inference(checkpoint_path, device=None):
    """(checkpoint dict with its cfg completed, encoder, decoder) on the chosen device, in eval mode."""
    device = pick_device(device)
    checkpoint = check_checkpoint(load_checkpoint(checkpoint_path), checkpoint_path)
    encoder, decoder = load_models(checkpoint, device, checkpoint_path)
    return checkpoint, encoder, decoder


def check_whole_number(name, value, least=1):
    """A keyword of test, caption or compare that must be a whole number of at least `least` (its option:
    --name-with-dashes)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ToolkitError(f"{name} = {value!r} must be a whole number of at least {least} "
                           f"(--{name.replace('_', '-')})")


def check_beam_size(beam_size):
    check_whole_number("beam_size", beam_size)


def clamp_beam_size(beam_size, word_map):
    """Beam search keeps at most one beam per word of the vocabulary."""
    if beam_size > len(word_map):
        print(f"note: beam_size = {beam_size} is larger than the vocabulary ({len(word_map)} words); using "
              f"{len(word_map)}")
        return len(word_map)
    return beam_size


def image_tensor(source, image_size):
    """A path, PIL image or uint8 tensor (3, H, W) -> uint8 tensor (3, S, S); a ToolkitError names a bad one."""
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.dim() != 3 or source.size(0) != 3:
            raise ToolkitError(f"an image tensor must be uint8 shaped (3, H, W); got {source.dtype} "
                               f"{tuple(source.shape)}")
        if source.shape[1:] == (image_size, image_size):
            return source.cpu()
        source = Image.fromarray(source.permute(1, 2, 0).cpu().numpy())  # resized as a file would be
    if isinstance(source, (str, os.PathLike)):
        check_regular_file(source)
    return read_image(source, image_size)


def check_regular_file(path):
    """Refuse a path that exists but is no regular file (a named pipe would block the reader forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # read_image names a missing or unreadable file
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise ToolkitError(f"image {os.fspath(path)!r} is {kind}, not an image file; pass image files, or folders "
                           f"of them")


def is_one_image(images):
    """True for a single path, PIL image or (3, H, W) tensor; False for a list of them or a (B, 3, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        return images.dim() == 3
    return isinstance(images, (str, os.PathLike, Image.Image))


def expand_folders(images):
    """A list of sources, with every folder replaced by the image files in it (sorted by name): regular files
    only, so that a named pipe or a subfolder with an image's name is left out (reading a pipe would block)."""
    expanded = []
    for source in [images] if is_one_image(images) else images:
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            names = sorted(name for name in os.listdir(source) if name.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(source, name)))
            if not names:
                print(f"note: folder {os.fspath(source)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})",
                      file=sys.stderr)
            expanded.extend(os.path.join(source, name) for name in names)
        else:
            expanded.append(source)
    return expanded


def source_name(source):
    """The path of a file source; None for an image given in memory."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None


class Captioner:
    """A trained model ready to caption: encoder, decoder and word map on one device, in eval mode."""

    def __init__(self, encoder, decoder, word_map, image_size, cfg):
        self.encoder, self.decoder, self.word_map = encoder, decoder, word_map
        self.image_size, self.cfg = image_size, cfg  # cfg: the checkpoint's, completed by upgrade_cfg
        self.words = {index: word for word, index in word_map.items()}
        self.device = next(decoder.parameters()).device

    @classmethod
    def from_checkpoint(cls, path, device=None):
        """Load a checkpoint of this toolkit (an older one too: its missing cfg keys take their defaults)."""
        checkpoint, encoder, decoder = load_for_inference(path, device)
        return cls(encoder, decoder, checkpoint["word_map"], checkpoint["image_size"], checkpoint["cfg"])

    @staticmethod
    def from_checkpoints(paths, device=None):
        """One checkpoint path: from_checkpoint's Captioner. Several: their EnsembleCaptioner, with every checkpoint
        loaded and checked, and their word maps compared, before any model is built."""
        if not paths:
            raise ToolkitError("no checkpoint given: pass one checkpoint path, or several for an ensemble")
        if len(paths) == 1:
            return Captioner.from_checkpoint(paths[0], device)
        device = pick_device(device)
        checkpoints = [check_checkpoint(load_checkpoint(path), path) for path in paths]
        check_word_maps(paths, [checkpoint["word_map"] for checkpoint in checkpoints])
        models = [load_models(checkpoint, device, path) for checkpoint, path in zip(checkpoints, paths)]
        encoders, decoders = zip(*models)  # per model its (encoder, decoder)
        return EnsembleCaptioner(encoders, decoders, checkpoints[0]["word_map"],
                                 [checkpoint["image_size"] for checkpoint in checkpoints], checkpoints[0]["cfg"])

    def encode(self, images, largest_batch=50):
        """uint8 images (B, 3, S, S) -> encodings (B, G, G, C) on the model's device, with the device's plan for
        passes of up to largest_batch images."""
        return encode_images(self.encoder, images.to(self.device), inference_plan(self.device, largest_batch))

    def read(self, source):
        """A path, PIL image or uint8 tensor (3, H, W) -> the image as encode takes it: uint8 (3, S, S)."""
        return image_tensor(source, self.image_size)

    def decode(self, encoder_out, beam_size=3, max_steps=50, length_penalty=0.0, block_trigrams=False, n_best=1):
        """Encodings (B, G, G, C) (an ensemble's: a tuple, one per model) -> per image, a list of its n_best
        beam_search Captions, best first (n_best at most beam_size, which clamp_beam_size may have lowered)."""
        n_best = min(n_best, beam_size)
        found = beam_search(self.decoder, encoder_out, self.word_map["<start>"], self.word_map["<end>"], beam_size,
                            max_steps, length_penalty, block_trigrams, n_best)
        return [[caption] for caption in found] if n_best == 1 else found

    def caption(self, images, beam_size=3, max_steps=50, batch_size=50, length_penalty=0.0, block_trigrams=False,
                n_best=1):
        """Caption paths (files or folders), PIL images or uint8 tensors (3, H, W) (one, a list, or a tensor
        (B, 3, H, W)), batch_size at a time; length_penalty, block_trigrams and n_best: see beam_search.py.

        Returns one dict per image, in order: path (None for an image in memory), caption (str; None when
        the image could not be read, with the reason in error), words (every word from <start> to <end>),
        seq (their ids), score (total log-probability), alphas ((T, P) attention per generated word, None
        without attention), betas ((T,) sentinel weights of the adaptive decoder, else None), grid (G), and
        n_best: the n_best captions, best first (the first is the caption above), each a dict of caption, seq,
        score and ranking_score (the score length-normalised with length_penalty, which ranks them).
        """
        check_beam_size(beam_size)
        check_search_options(beam_size, length_penalty, block_trigrams, n_best)
        check_whole_number("max_steps", max_steps)
        check_whole_number("batch_size", batch_size)
        search = {"beam_size": clamp_beam_size(beam_size, self.word_map), "max_steps": max_steps,
                  "length_penalty": length_penalty, "block_trigrams": block_trigrams, "n_best": n_best}
        sources = expand_folders(images)
        results = []
        largest_batch = min(batch_size, len(sources))
        for start in range(0, len(sources), batch_size):
            results.extend(self.caption_batch(sources[start:start + batch_size], largest_batch, search))
        return results

    def caption_batch(self, sources, largest_batch, search):
        """Results of caption() for one batch of sources: the readable ones go through the model together, searched
        with decode's keywords `search`."""
        results, pixels = [], []
        for source in sources:
            results.append({"path": source_name(source), "caption": None, "error": None})
            try:
                pixels.append(self.read(source))
            except ToolkitError as error:
                print(f"error: {error}", file=sys.stderr)
                results[-1]["error"] = str(error)
        readable = [result for result in results if result["error"] is None]
        if readable:
            encoder_out = self.encode(default_collate(pixels), largest_batch)  # (B, G, G, C), or one per model
            for result, found in zip(readable, self.decode(encoder_out, **search)):
                result.update(self.describe(found))
        return results

    def describe(self, found):
        """The fields of a result for an image's beam_search Captions, best first."""
        best = found[0]
        return {"caption": self.text(best), "words": [self.words[w] for w in best.words], "seq": best.words,
                "score": best.score, "alphas": best.alphas, "betas": best.betas,
                "grid": self.cfg["encoded_image_size"], "n_best": self.n_best_fields(found)}

    def n_best_fields(self, found):
        """An image's Captions as dicts of caption, seq, score and ranking_score, in their order."""
        return [{"caption": self.text(caption), "seq": caption.words, "score": caption.score,
                 "ranking_score": caption.ranking_score} for caption in found]

    def text(self, caption):
        """A Caption's words without the special ones, joined by spaces."""
        return " ".join(self.words[w] for w in strip_special(caption.words, self.word_map))


class EnsembleCaptioner(Captioner):
    """Several trained models of one word map captioning as one: each encodes the images at its own image size into
    its own grid, and their decoders search together as an Ensemble (ensemble.py). encoder, image_size and cfg are
    the first model's: the grid of the attention reported, the data test reads."""

    def __init__(self, encoders, decoders, word_map, image_sizes, cfg):
        super().__init__(encoders[0], Ensemble(decoders), word_map, image_sizes[0], cfg)
        self.encoders, self.image_sizes = encoders, image_sizes

    def encode(self, images, largest_batch=50):
        """uint8 images (B, 3, S, S) for every model, or a sequence of them, one per model at its image size -> per
        model its encodings (B, G_m, G_m, C_m), a tuple."""
        if isinstance(images, torch.Tensor):
            images = [images] * len(self.encoders)
        plan = inference_plan(self.device, largest_batch)
        return tuple(encode_images(encoder, pixels.to(self.device), plan)
                     for encoder, pixels in zip(self.encoders, images, strict=True))

    def read(self, source):
        """A path, PIL image or uint8 tensor (3, H, W) -> per model the image at its image size, uint8 (3, S_m, S_m)."""
        return tuple(image_tensor(source, size) for size in self.image_sizes)


def result_figure(result, smooth=True, out=None):
    """The course's figure of a Captioner result of an image file: per-word attention panels (with beta_t for
    the adaptive decoder), or the image under its caption without attention. Writes a PNG when `out`."""
    if result["caption"] is None:
        raise ToolkitError(result["error"])
    if result["path"] is None:
        raise ToolkitError("the figure draws the image file; caption the image by its path to draw it")
    return visualize_att(result["path"], result["seq"], result["alphas"], dict(zip(result["seq"], result["words"])),
                         smooth=smooth, out=out, betas=result["betas"])
