"""images.load_image: the one loader of preprocessing and inference."""
import numpy as np
import pytest
import torch
from PIL import Image

import images
from utils import ToolkitError

SIZE = 16
ORIENTATION = 0x0112  # the EXIF tag


def pattern(width=40, height=24):
    """An RGB picture whose quadrants differ, so that any rotation or flip shows."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:height // 2, :width // 2] = (250, 0, 0)
    pixels[:height // 2, width // 2:] = (0, 250, 0)
    pixels[height // 2:, :width // 2] = (0, 0, 250)
    pixels[height // 2:, width // 2:] = (250, 250, 250)
    return Image.fromarray(pixels)


def expected_pixels(image):
    """What preprocessing has always stored: RGB, bilinear to SIZE x SIZE, channels first."""
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def test_a_path_and_a_pil_image_give_the_course_pixels(tmp_path):
    path = tmp_path / "picture.png"
    pattern().save(path)
    from_path = images.load_image(str(path), SIZE)
    assert from_path.dtype == np.uint8 and from_path.shape == (3, SIZE, SIZE) and from_path.flags.c_contiguous
    np.testing.assert_array_equal(from_path, expected_pixels(pattern()))
    np.testing.assert_array_equal(images.load_image(pattern(), SIZE), from_path)
    tensor = images.load_image_tensor(str(path), SIZE)
    assert tensor.dtype == torch.uint8 and torch.equal(tensor, torch.from_numpy(from_path))


@pytest.mark.parametrize("orientation, transpose", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                                    (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_turns_the_picture_upright(tmp_path, orientation, transpose):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / "phone.png"  # PNG: lossless, so the comparison can be exact
    pattern().save(path, exif=exif)
    upright = expected_pixels(pattern().transpose(transpose))
    np.testing.assert_array_equal(images.load_image(str(path), SIZE), upright)
    with Image.open(path) as opened:
        np.testing.assert_array_equal(images.load_image(opened, SIZE), upright)
        assert opened.getexif()[ORIENTATION] == orientation  # the caller's image is left as it was


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    assert (images.load_image(str(path), SIZE) == 40000 // 256).all()  # 156, not 255


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert tuple(images.load_image(cmyk, SIZE)[:, 0, 0]) == (255, 0, 0)


def test_a_bad_file_is_a_toolkit_error_naming_it(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(images.BadImageError, match="broken.jpg") as error:
        images.load_image(str(path), SIZE)
    assert isinstance(error.value, ToolkitError) and "UnidentifiedImageError" in error.value.reason
    with pytest.raises(ToolkitError, match="missing.jpg.*does not exist"):
        images.load_image(str(tmp_path / "missing.jpg"), SIZE)


def test_a_decompression_bomb_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    pattern(64, 64).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: more than twice the limit
    with pytest.raises(ToolkitError, match=r"bomb\.png.*decompression-bomb limit.*MAX_IMAGE_PIXELS"):
        images.load_image(str(path), SIZE)
