"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021): how well a caption fits its image (CLIP-S), and its
image and references together (RefCLIP-S), from the cosines of CLIP embeddings; no reference needed for CLIP-S.

    CLIP-S    = 2.5 * max(cos(image, caption), 0)
    RefCLIP-S = harmonic mean of CLIP-S and max(max over references r of cos(caption, r), 0)

both per image, then averaged over the images, on a scale of 0 to 2.5 (the paper reports them x 100). Every text,
caption and reference, is prefixed with "A photo depicts " as in the paper's code. The CLIP model is named
"<open_clip model>:<pretrained tag or state_dict file>", by default the paper's ViT-B/32 with OpenAI's weights.

    result = clip_scores("ViT-B-32:openai", image_batches, captions, references, "cpu")
    # {"scores": {"clip_s": .., "refclip_s": ..}, "unavailable": {}}, or without the weights at hand
    # {"scores": {}, "unavailable": {"clip_scores": "why, and how to get them"}}

Weights are never downloaded here (offline, an attempt retries for about a minute): they come from a local file or
Hugging Face's cache, which one run of open_clip with internet fills.
"""
import os

import torch
import torch.nn.functional as F

from clip_models import cached_weights_file, import_open_clip, quick_gelu
from images import CLIP_MEAN, CLIP_STD, from_imagenet, normalize_images
from utils import ToolkitError

DEFAULT_CLIP_MODEL = "ViT-B-32:openai"
METRIC_KEY = "clip_metric_model"  # the option that names the model, in the errors (the reward's: clip_reward_model)
SCALE = 2.5  # the paper's w
PREFIX = "A photo depicts "
TEXT_BATCH = 256  # texts encoded a call


def parse_model(spec, key=METRIC_KEY):
    """'ViT-B-32:openai' -> ('ViT-B-32', 'openai'); the part after the first ':' may be a file's path. `key`: the
    option whose value spec is, named in the error."""
    name, _, weights = spec.partition(":")
    if not name or not weights:
        raise ToolkitError(f"{key} {spec!r} names no model or no weights: write <open_clip model>:"
                           f"<pretrained tag or state_dict file>, e.g. {DEFAULT_CLIP_MODEL}")
    return name, weights


def clip_s(image_embeddings, caption_embeddings):
    """Per-image CLIP-S (N,) of unit-length embeddings (N, D) of the images and of their captions."""
    return SCALE * (image_embeddings * caption_embeddings).sum(-1).clamp(min=0)


def refclip_s(clip_s_values, caption_embeddings, reference_embeddings, reference_image):
    """Per-image RefCLIP-S (N,): the harmonic mean of CLIP-S (N,) and max(max_r cos(caption, r), 0), from unit
    embeddings of the captions (N, D) and of every reference (R, D), reference_image (R,) its image's index."""
    cosines = (caption_embeddings[reference_image] * reference_embeddings).sum(-1)  # (R,)
    best = torch.full_like(clip_s_values, -1.0).scatter_reduce(0, reference_image, cosines, "amax").clamp(min=0)
    total = clip_s_values + best  # (N,)
    return torch.where(total > 0, 2 * clip_s_values * best / total.clamp(min=1e-12), 0.0)


class ClipScorer:
    """A CLIP model and its tokenizer: unit-length embeddings of images and texts, and the scores."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.image_size = tuple(model.visual.image_size)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def image_embeddings(self, images):
        """uint8 images (B, 3, H, W) -> (B, D): squashed to the model's input size (bicubic), CLIP-normalised."""
        pixels = normalize_images(images.to(self.device))  # ImageNet-normalised (B, 3, H, W)
        pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        embeddings = self.model.encode_image(from_imagenet(pixels, CLIP_MEAN, CLIP_STD))  # (B, D)
        return F.normalize(embeddings.float(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, texts):
        """Texts -> (N, D) embeddings of "A photo depicts <text>", TEXT_BATCH texts a call."""
        chunks = [self.tokenizer([PREFIX + text for text in texts[start:start + TEXT_BATCH]]).to(self.device)
                  for start in range(0, len(texts), TEXT_BATCH)]  # each (n, context length)
        return F.normalize(torch.cat([self.model.encode_text(tokens).float() for tokens in chunks]), dim=-1)

    def batch_embeddings(self, image_batches):
        """(N, D) embeddings of the images of uint8 `image_batches` (each (B, 3, H, W)), in order."""
        return torch.cat([self.image_embeddings(batch) for batch in image_batches])

    def scores(self, image_batches, captions, references):
        """{"clip_s", "refclip_s"}, means over the images of uint8 `image_batches` (in order), captions[i] the
        caption of image i and references[i] its reference captions."""
        image_embeddings = self.batch_embeddings(image_batches)  # (N, D)
        caption_embeddings = self.text_embeddings(captions)  # (N, D)
        reference_embeddings = self.text_embeddings([text for texts in references for text in texts])  # (R, D)
        reference_image = torch.tensor([image for image, texts in enumerate(references) for _ in texts],
                                       device=self.device)  # (R,)
        per_image = clip_s(image_embeddings, caption_embeddings)  # (N,)
        with_references = refclip_s(per_image, caption_embeddings, reference_embeddings, reference_image)  # (N,)
        return {"clip_s": per_image.mean().item(), "refclip_s": with_references.mean().item()}


def weights_path(spec, key=METRIC_KEY):
    """(model name, weights, local file of the weights) of spec, from a file or Hugging Face's cache, without
    building anything; a ToolkitError naming `key` and spec, saying why not (open_clip missing, an unknown model
    or tag, weights not at hand) and how to get them."""
    open_clip = import_open_clip()
    name, weights = parse_model(spec, key)
    if name not in open_clip.list_models():
        raise ToolkitError(f"{key} {spec!r}: open_clip has no model {name!r} (open_clip.list_models())")
    if os.path.isfile(weights):
        path = weights
    elif weights in open_clip.list_pretrained_tags_by_model(name):
        path = cached_weights_file(name, weights)
    else:
        raise ToolkitError(f"{key} {spec!r}: {weights!r} is neither a file nor a pretrained tag of "
                           f"{name} ({', '.join(open_clip.list_pretrained_tags_by_model(name))})")
    if path is None:
        raise ToolkitError(f"{key} {spec!r}: the {name} weights {weights!r} are not in Hugging Face's cache "
                           f"(~/.cache/huggingface) and are never downloaded here: fetch them once with internet "
                           f"(python -c \"import open_clip; open_clip.create_model('{name}', "
                           f"pretrained='{weights}')\") or give {name}:<path of a state_dict file>")
    return name, weights, path


def load_scorer(spec, device, key=METRIC_KEY):
    """The ClipScorer of spec's model with its weights from a file or Hugging Face's cache (weights_path: its
    ToolkitError names `key` when they are not at hand)."""
    name, weights, path = weights_path(spec, key)
    open_clip = import_open_clip()
    model = open_clip.create_model(name, pretrained=path, force_quick_gelu=quick_gelu(name, weights), device=device)
    return ClipScorer(model, open_clip.get_tokenizer(name))


def clip_scores(spec, image_batches, captions, references, device):
    """{"scores": {"clip_s", "refclip_s"}, "unavailable": {}}, or, when spec's model cannot be loaded,
    {"scores": {}, "unavailable": {"clip_scores": why}} (as metrics.coco_caption_metrics reports)."""
    try:
        scorer = load_scorer(spec, device)
    except ToolkitError as error:
        return {"scores": {}, "unavailable": {"clip_scores": str(error)}}
    return {"scores": scorer.scores(image_batches, captions, references), "unavailable": {}}
