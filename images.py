"""The one image loader of the toolkit: preprocessing and inference read pictures the same way.

    pixels = load_image("photo.jpg", 256)         # uint8 numpy array (3, 256, 256)
    tensor = load_image_tensor("photo.jpg", 256)  # the same pixels as a torch uint8 tensor
    inputs = normalize_images(tensor)             # float32, normalised as the encoders expect (IMAGENET_MEAN/STD)
    clip_inputs = from_imagenet(inputs, CLIP_MEAN, CLIP_STD)  # the same pixels as a CLIP backbone expects them

The picture is turned upright by its EXIF orientation, converted to RGB from any Pillow mode (16- and
32-bit grey scaled to 8 bits, not clipped) and squashed to a square with bilinear resampling, as the
course's scipy.misc.imresize did. torch is imported only by load_image_tensor and normalize_images, so
preprocessing workers start without it.
"""
import numpy as np
from PIL import Image, ImageOps

from utils import ToolkitError

RESAMPLE = Image.Resampling.BILINEAR  # the course's scipy.misc.imresize default ('bilinear', via PIL)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's CLIP (and open_clip's models)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BadImageError(ToolkitError):
    """An image file that cannot be decoded; `reason` says why, without the advice around it."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path!r}: {reason}; replace the file or leave it out")
        self.path, self.reason = path, reason


def to_rgb(image):
    """Any Pillow mode as RGB; 16- and 32-bit grey is scaled from 0..65535 instead of clipped."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit PNG/TIFF
        grey = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
        image = Image.fromarray(grey)
    return image.convert("RGB")


def square_pixels(image, size):
    """An upright, loaded PIL image -> uint8 array (3, size, size), squashed to a square as the course."""
    resized = to_rgb(image).resize((size, size), RESAMPLE)
    return np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1))  # (S, S, 3) -> (3, S, S)


def load_image(source, size):
    """A path or a PIL image -> uint8 array (3, size, size); a BadImageError (a ToolkitError) naming the
    file when it cannot be decoded."""
    if isinstance(source, Image.Image):
        return square_pixels(ImageOps.exif_transpose(source), size)  # a copy: the caller's image is left as is
    try:
        with Image.open(source) as image:
            image.draft(None, (size, size))  # JPEG: DCT-scale by 1/2..1/8 while both sides stay >= size
            ImageOps.exif_transpose(image, in_place=True)
            return square_pixels(image, size)
    except Image.DecompressionBombError as error:  # not an OSError
        raise BadImageError(source, f"it has more pixels than Pillow's decompression-bomb limit allows "
                                    f"({error}); if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except FileNotFoundError:
        raise BadImageError(source, "the file does not exist") from None
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError...) for bad files
        raise BadImageError(source, f"{type(error).__name__}: {error}") from None


def load_image_tensor(source, size):
    """load_image as a torch uint8 tensor (3, size, size)."""
    import torch

    return torch.from_numpy(load_image(source, size))


def normalize_images(images):
    """uint8 images (..., 3, H, W) -> float32 scaled to [0, 1] and normalised with ImageNet's mean and std,
    on the images' device."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    return TF.normalize(TF.to_dtype(images, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)


def from_imagenet(images, mean, std):
    """ImageNet-normalised float images (..., 3, H, W) -> the same pixels normalised with `mean` and `std` instead
    (one affine map, the images themselves for ImageNet's own)."""
    if (tuple(mean), tuple(std)) == (IMAGENET_MEAN, IMAGENET_STD):
        return images
    # Constants, not buffers: every tensor of a model is in its state_dict (models.uninitialised relies on it).
    scale = images.new_tensor([imagenet / own for imagenet, own in zip(IMAGENET_STD, std)]).view(3, 1, 1)
    shift = images.new_tensor([(imagenet - own) / own_std
                               for imagenet, own, own_std in zip(IMAGENET_MEAN, mean, std)]).view(3, 1, 1)
    return images * scale + shift  # (x * s + m - m') / s' with s, m ImageNet's
