"""Results files of the COCO evaluation server: image ids from COCO file names, the refusals before any
captioning, and `caption --coco-results` on tiny images named like COCO's."""
import json

import numpy as np
import pytest
from PIL import Image

import solver
from coco_results import check_coco_results, coco_image_id
from conftest import tiny_cfg
from utils import ToolkitError

RESULTS_NAME = "captions_val2014_tiny_results.json"


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes, tmp_path_factory):
    """The best checkpoint of one short run of the decoder without attention."""
    return solver.train(tiny_cfg(tiny_shapes, tmp_path_factory.mktemp("coco_results")))["best_checkpoint"]


def write_images(folder, names):
    """Small random RGB pictures under the given file names; returns their paths."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return [str(folder / name) for name in names]


@pytest.mark.parametrize("name, image_id", [
    ("COCO_val2014_000000123456.jpg", 123456),
    ("COCO_test2014_000000000001.jpg", 1),
    ("COCO_train2014_000000581921.jpg", 581921),
    ("/data/coco2014/val2014/COCO_val2014_000000391895.jpg", 391895),
])
def test_the_image_id_is_read_from_cocos_file_names(name, image_id):
    assert coco_image_id(name) == image_id


@pytest.mark.parametrize("name", ["photo.jpg", "COCO_val2014_.jpg", "COCO_val2017_000000123456.jpg",
                                  "val2014_000000123456.jpg", "COCO_val2014_000000123456", "xCOCO_val2014_1.jpg"])
def test_a_name_without_a_coco_id_is_refused_naming_the_file(name):
    assert coco_image_id(name) is None
    with pytest.raises(ToolkitError, match="no COCO image id") as error:
        check_coco_results(RESULTS_NAME, ["COCO_val2014_000000000001.jpg", f"pictures/{name}"])
    assert f"pictures/{name}" in str(error.value) and "COCO_val2014_<12-digit id>.jpg" in str(error.value)


def test_one_image_given_twice_is_refused():
    with pytest.raises(ToolkitError, match="are both COCO image 7; pass each image once"):
        check_coco_results(RESULTS_NAME, ["a/COCO_val2014_000000000007.jpg", "b/COCO_val2014_000000000007.jpg"])


@pytest.mark.parametrize("name", ["results.json", "captions_val2017_x_results.json", "captions_val2014_results.json",
                                  "captions_val2014_x_results.jsonl", "captions_train2014_x_results.json"])
def test_a_results_file_name_the_server_does_not_take_is_refused_with_the_form(name):
    with pytest.raises(ToolkitError, match="captions_val2014_<alg>_results.json or captions_test2014_<alg>"):
        check_coco_results(name, ["COCO_val2014_000000000001.jpg"])


def test_caption_writes_the_servers_json_with_the_ids_of_the_file_names(checkpoint, tmp_path):
    ids = [42, 391895, 7]
    write_images(tmp_path / "val2014", [f"COCO_val2014_{image_id:012d}.jpg" for image_id in ids])
    results = tmp_path / RESULTS_NAME
    solver.main(["caption", "--checkpoint", checkpoint, str(tmp_path / "val2014"), "--coco-results", str(results),
                 "--device", "cpu", "--batch-size", "2"])
    entries = json.loads(results.read_text())
    assert sorted(entry["image_id"] for entry in entries) == sorted(ids)
    assert all(set(entry) == {"image_id", "caption"} and isinstance(entry["image_id"], int)
               and isinstance(entry["caption"], str) and entry["caption"].split() for entry in entries)
    assert sorted(path.name for path in tmp_path.iterdir()) == [RESULTS_NAME, "val2014"]  # no temporary file left


@pytest.mark.parametrize("image_names, results_name, message", [
    (["COCO_val2014_000000000001.jpg", "holiday.jpg"], RESULTS_NAME, "holiday.jpg"),
    (["COCO_val2014_000000000001.jpg"], "my_results.json", "captions_val2014_<alg>_results.json"),
])
def test_the_refusal_comes_before_any_captioning(tmp_path, monkeypatch, image_names, results_name, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(solver.Captioner, "from_checkpoint", no_model)
    images = write_images(tmp_path / "pictures", image_names)
    with pytest.raises(ToolkitError, match=message):
        solver.caption("never_loaded.pth.tar", images, coco_results=str(tmp_path / results_name))
    assert not (tmp_path / results_name).exists()


def test_an_unreadable_image_leaves_no_results_file(checkpoint, tmp_path):
    images = write_images(tmp_path / "val2014", ["COCO_val2014_000000000001.jpg"])
    broken = tmp_path / "val2014" / "COCO_val2014_000000000002.jpg"
    broken.write_bytes(b"not a picture")
    results = tmp_path / RESULTS_NAME
    with pytest.raises(ToolkitError, match="could not be read, so no COCO results file was written"):
        solver.caption(checkpoint, images + [str(broken)], device="cpu", coco_results=str(results))
    assert not results.exists()
