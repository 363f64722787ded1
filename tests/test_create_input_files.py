"""create_input_files: the course's files (plus REFS) from a Karpathy split, and its bad-input errors."""
import collections
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import types

import h5py
import numpy as np
import pytest
from PIL import Image

import create_input_files as cif
import images
from create_input_files import create_input_files
from data_files import SPLITS
import utils
from fixtures import write_tiny_karpathy
from utils import ToolkitError

CPI, MIN_FREQ, MAX_LEN, SIZE = 5, 1, 8, 32
BASE = f"flickr8k_{CPI}_cap_per_img_{MIN_FREQ}_min_word_freq"
KARPATHY_SPLITS = {"TRAIN": ("train", "restval"), "VAL": ("val",), "TEST": ("test",)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_files(json_path, image_folder, output_folder, dataset="flickr8k", **options):
    options = {"max_len": MAX_LEN, "image_size": SIZE, "workers": 1, **options}
    return create_input_files(dataset, json_path, image_folder, CPI, MIN_FREQ, output_folder, **options)


def read(folder, prefix, split="", base=BASE):
    """Load one output file: the images array for IMAGES, the JSON value otherwise."""
    name = f"{split}_{prefix}_{base}" if split else f"{prefix}_{base}"
    if prefix == "IMAGES":
        with h5py.File(os.path.join(folder, name + ".hdf5"), "r") as h5:
            return h5["images"][:], h5.attrs["captions_per_image"]
    with open(os.path.join(folder, name + ".json")) as file:
        return json.load(file)


def karpathy_records(json_path, split):
    with open(json_path) as file:
        return [image for image in json.load(file)["images"] if image["split"] in KARPATHY_SPLITS[split]]


def kept_sentences(record):
    return [s["tokens"] for s in record["sentences"] if len(s["tokens"]) <= MAX_LEN]


def edit_json(json_path, edit):
    with open(json_path) as file:
        data = json.load(file)
    edit(data)
    with open(json_path, "w") as file:
        json.dump(data, file)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_karpathy(str(tmp_path_factory.mktemp("source")), n_per_split=4)


@pytest.fixture(scope="module")
def made(source, tmp_path_factory):
    output_folder = str(tmp_path_factory.mktemp("made"))
    return output_folder, make_files(*source, output_folder)


@pytest.fixture
def own_source(tmp_path):
    """A private copy of the inputs, for tests that break them."""
    return write_tiny_karpathy(str(tmp_path / "source"), n_per_split=4)


def test_writes_the_course_files_plus_refs_and_a_summary(made):
    folder, summary = made
    expected = {f"WORDMAP_{BASE}.json"} | {f"{split}_{kind}_{BASE}.{extension}" for split in SPLITS
                                           for kind, extension in (("IMAGES", "hdf5"), ("CAPTIONS", "json"),
                                                                   ("CAPLENS", "json"), ("REFS", "json"))}
    assert set(os.listdir(folder)) == expected
    assert summary == {"data_name": BASE, "images": {"TRAIN": 4, "VAL": 4, "TEST": 4}, "captions": 60,
                       "vocab_size": len(read(folder, "WORDMAP")), "skipped": 0,
                       "bytes_written": sum(os.path.getsize(os.path.join(folder, name)) for name in expected)}


def test_images_captions_and_lengths_have_the_course_shapes(made):
    folder, _ = made
    for split in SPLITS:
        images, captions_per_image = read(folder, "IMAGES", split)
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == np.uint8
        assert captions_per_image == CPI
        captions, caplens = read(folder, "CAPTIONS", split), read(folder, "CAPLENS", split)
        assert len(captions) == len(caplens) == 4 * CPI
        assert {len(caption) for caption in captions} == {MAX_LEN + 2}


def test_word_map_holds_train_words_seen_more_than_min_word_freq(made, source):
    folder, _ = made
    counts = collections.Counter(word for record in karpathy_records(source[0], "TRAIN")
                                 for tokens in kept_sentences(record) for word in tokens)
    words = [word for word, count in counts.items() if count > MIN_FREQ]  # first-seen order
    expected = {word: index + 1 for index, word in enumerate(words)}
    expected.update({"<unk>": len(words) + 1, "<start>": len(words) + 2, "<end>": len(words) + 3, "<pad>": 0})
    assert read(folder, "WORDMAP") == expected
    assert not any(word.startswith("rare") for word in expected)  # each rare word is seen once


def test_captions_run_start_to_end_over_caplen_then_pad_and_decode_to_sampled_sentences(made, source):
    folder, _ = made
    word_map = read(folder, "WORDMAP")
    words = {index: word for word, index in word_map.items()}
    for split in SPLITS:
        captions, caplens = read(folder, "CAPTIONS", split), read(folder, "CAPLENS", split)
        for image_index, record in enumerate(karpathy_records(source[0], split)):
            kept = [[word if word in word_map else "<unk>" for word in tokens] for tokens in kept_sentences(record)]
            decoded = []
            for caption, caplen in zip(captions[image_index * CPI:(image_index + 1) * CPI],
                                       caplens[image_index * CPI:(image_index + 1) * CPI]):
                assert caption[0] == word_map["<start>"] and caption[caplen - 1] == word_map["<end>"]
                assert set(caption[caplen:]) <= {word_map["<pad>"]}
                decoded.append([words[index] for index in caption[1:caplen - 1]])
            if len(kept) < CPI:  # every sentence, plus draws with replacement
                assert all(sentence in decoded for sentence in kept)
                assert all(sentence in kept for sentence in decoded)
            else:  # a sample without replacement
                remaining = list(kept)
                for sentence in decoded:
                    remaining.remove(sentence)  # ValueError if drawn twice or not a kept sentence


def test_refs_hold_every_original_sentence_and_the_file_name_as_id(made, source):
    folder, _ = made
    for split in SPLITS:
        records = karpathy_records(source[0], split)
        assert read(folder, "REFS", split) == [
            {"image_id": record["filename"], "references": [s["tokens"] for s in record["sentences"]]}
            for record in records]
        assert any(len(s["tokens"]) > MAX_LEN for record in records for s in record["sentences"])


def test_coco_layout_and_cocoid(tmp_path):
    json_path, image_folder = write_tiny_karpathy(str(tmp_path / "source"), n_per_split=2, dataset="coco")
    assert os.path.isdir(os.path.join(image_folder, "train2014"))
    summary = make_files(json_path, image_folder, str(tmp_path / "out"), dataset="coco")
    assert summary["data_name"] == f"coco_{CPI}_cap_per_img_{MIN_FREQ}_min_word_freq"
    refs = read(str(tmp_path / "out"), "REFS", "VAL", base=summary["data_name"])
    assert [entry["image_id"] for entry in refs] == [r["cocoid"] for r in karpathy_records(json_path, "VAL")]


def test_images_of_every_mode_become_rgb_resized_with_pillow(made, source):
    folder, _ = made
    records = karpathy_records(source[0], "TRAIN") + karpathy_records(source[0], "VAL")
    stored = np.concatenate([read(folder, "IMAGES", "TRAIN")[0], read(folder, "IMAGES", "VAL")[0]])
    for record, pixels in zip(records, stored):
        with Image.open(os.path.join(source[1], record["filename"])) as image:
            if image.mode == "I;16":  # 16-bit grey: scaled to 8 bits, not clipped at 255
                image = Image.fromarray((np.asarray(image) // 257).astype(np.uint8))
            expected = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            mode = image.mode
        assert np.abs(pixels.transpose(1, 2, 0).astype(int) - expected).max() <= 1, mode
        if mode in ("L", "I;16"):
            assert (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()


def test_large_jpeg_decoded_at_reduced_scale_keeps_quality(tmp_path):
    gradient = np.linspace(0, 255, 1024, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:768, None], 128 + 0 * gradient[None, :]), -1)
    path = str(tmp_path / "big.jpg")
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    drafted, error = cif.decode_image(path, 256)
    with Image.open(path) as image:  # full-scale decode, same resize
        full = np.asarray(image.convert("RGB").resize((256, 256), images.RESAMPLE)).transpose(2, 0, 1)
    assert error is None and drafted.shape == (3, 256, 256)
    mse = np.mean((drafted.astype(float) - full) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-9)) > 40  # PSNR in dB


def same_files(folder, other_folder):
    """Assert that two output folders hold the same file names with the same bytes."""
    assert sorted(os.listdir(folder)) == sorted(os.listdir(other_folder))
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as one, open(os.path.join(other_folder, name), "rb") as two:
            assert one.read() == two.read(), name


def test_two_workers_write_the_same_bytes_as_one(made, source, tmp_path, monkeypatch):
    monkeypatch.setattr(cif, "IMAGES_PER_CHUNK", 1)  # 12 images: 12 chunks, more than the workers hold at once
    make_files(*source, str(tmp_path), workers=2)
    same_files(made[0], str(tmp_path))


def test_images_left_without_a_short_enough_sentence_are_skipped(own_source, tmp_path):
    json_path, image_folder = own_source
    def lengthen_first_train_image(data):
        for sentence in data["images"][0]["sentences"]:
            sentence["tokens"] += ["very"] * MAX_LEN
    edit_json(json_path, lengthen_first_train_image)
    with pytest.warns(UserWarning, match=r"1 image\(s\) .* no sentence of at most max_len=8 tokens .*: 0000_RGB.jpg"):
        summary = make_files(json_path, image_folder, str(tmp_path / "out"))
    assert summary["images"]["TRAIN"] == 3
    refs = read(str(tmp_path / "out"), "REFS", "TRAIN")
    assert [entry["image_id"] for entry in refs] == [r["filename"] for r in karpathy_records(json_path, "TRAIN")[1:]]


def break_image(image_folder, record_index, json_path, how):
    with open(json_path) as file:
        record = json.load(file)["images"][record_index]
    path = os.path.join(image_folder, record["filename"])
    if how == "delete":
        os.remove(path)
    elif how == "garbage":
        with open(path, "wb") as file:
            file.write(b"this is not an image")
    elif how == "truncate":
        with open(path, "rb") as file:
            data = file.read()
        with open(path, "wb") as file:
            file.write(data[:len(data) // 2])
    return record["filename"]


def missing_json(json_path, image_folder):
    os.remove(json_path)
    return os.path.basename(json_path)


def malformed_json(json_path, image_folder):
    with open(json_path, "w") as file:
        file.write('{"images": [')
    return os.path.basename(json_path)


def not_karpathy_json(json_path, image_folder):
    edit_json(json_path, lambda data: data["images"][2].pop("sentences"))
    return "image 2"


def missing_image(json_path, image_folder):
    return break_image(image_folder, 1, json_path, "delete")


def undecodable_image(json_path, image_folder):
    return break_image(image_folder, 5, json_path, "garbage")


def truncated_image(json_path, image_folder):
    return break_image(image_folder, 9, json_path, "truncate")  # a JPEG in the test split


def empty_split(json_path, image_folder):
    edit_json(json_path, lambda data: [image.update(split="val") for image in data["images"]
                                       if image["split"] == "test"])
    return "TEST"


@pytest.mark.parametrize("breaker", [missing_json, malformed_json, not_karpathy_json, missing_image,
                                     undecodable_image, truncated_image, empty_split])
def test_bad_input_raises_a_named_error_and_leaves_no_files(own_source, tmp_path, breaker):
    json_path, image_folder = own_source
    named = breaker(json_path, image_folder)
    output_folder = tmp_path / "out"
    with pytest.raises(ToolkitError, match=re.escape(named)):
        make_files(json_path, image_folder, str(output_folder), workers=2 if breaker is truncated_image else 1)
    assert not output_folder.exists() or os.listdir(output_folder) == []


def test_missing_image_error_names_the_expected_layout(own_source, tmp_path):
    json_path, image_folder = own_source
    break_image(image_folder, 0, json_path, "delete")
    with pytest.raises(ToolkitError, match="IMAGE_FOLDER/filename") as error:
        make_files(json_path, image_folder, str(tmp_path / "out"))
    assert image_folder in str(error.value)


def test_existing_outputs_are_refused_unless_overwrite(made, source):
    folder, _ = made
    before = {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}
    with pytest.raises(ToolkitError, match="--overwrite"):
        make_files(*source, folder)
    assert {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)} == before
    words = read(folder, "WORDMAP")
    make_files(*source, folder, overwrite=True)
    assert sorted(os.listdir(folder)) == sorted(before) and read(folder, "WORDMAP") == words


def test_skip_bad_images_skips_and_counts_them(own_source, tmp_path, monkeypatch):
    json_path, image_folder = own_source
    bad = [break_image(image_folder, 1, json_path, "garbage"), break_image(image_folder, 4, json_path, "truncate")]
    with pytest.warns(UserWarning) as warned:
        summary = make_files(json_path, image_folder, str(tmp_path / "one"), skip_bad_images=True)
    assert all(any(name in str(warning.message) for warning in warned) for name in bad)
    assert summary["skipped"] == 2 and summary["images"] == {"TRAIN": 3, "VAL": 3, "TEST": 4}
    images, _ = read(str(tmp_path / "one"), "IMAGES", "VAL")
    assert images.shape[0] == 3 and len(read(str(tmp_path / "one"), "CAPTIONS", "VAL")) == 3 * CPI
    ids = [entry["image_id"] for split in SPLITS for entry in read(str(tmp_path / "one"), "REFS", split)]
    assert len(ids) == 10 and not set(bad) & set(ids)
    monkeypatch.setattr(cif, "IMAGES_PER_CHUNK", 1)
    with pytest.warns(UserWarning):
        make_files(json_path, image_folder, str(tmp_path / "two"), skip_bad_images=True, workers=2)
    same_files(str(tmp_path / "one"), str(tmp_path / "two"))


def test_ctrl_c_leaves_no_files(own_source, tmp_path, monkeypatch):
    decoded = []
    def interrupted_after_two_images(path, size):
        if len(decoded) == 2:
            raise KeyboardInterrupt
        decoded.append(path)
        return np.zeros((3, SIZE, SIZE), dtype=np.uint8), None
    monkeypatch.setattr(cif, "decode_image", interrupted_after_two_images)
    with pytest.raises(KeyboardInterrupt):
        make_files(*own_source, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_shapes_command_generates_then_preprocesses(tmp_path, monkeypatch):
    calls = []
    def make_shapes_dataset(folder, n_train, n_val, n_test, seed, image_size):
        calls.append((folder, n_train, n_val, n_test, seed, image_size))
        return write_tiny_karpathy(folder, n_per_split=n_train, dataset="shapes", images_subfolder="shapes_images")[0]
    monkeypatch.setitem(sys.modules, "shapes", types.SimpleNamespace(make_shapes_dataset=make_shapes_dataset))
    cif.main(["--dataset", "shapes", "--output-folder", str(tmp_path), "--shapes-train", "2", "--shapes-val", "2",
              "--shapes-test", "2", "--seed", "7", "--image-size", "32", "--workers", "1"])
    assert calls == [(str(tmp_path), 2, 2, 2, 7, 32)]
    images, _ = read(str(tmp_path), "IMAGES", "TEST", base="shapes_5_cap_per_img_5_min_word_freq")
    assert images.shape == (2, 3, 32, 32)


def run_command(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "create_input_files.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_command_line_prints_a_summary(source, tmp_path):
    result = run_command("--dataset", "flickr8k", "--karpathy-json", source[0], "--image-folder", source[1],
                         "--output-folder", str(tmp_path), "--image-size", "16", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "12 images (TRAIN 4, VAL 4, TEST 4), 60 captions, vocabulary" in result.stdout
    assert len(os.listdir(tmp_path)) == 13


def test_command_line_error_has_no_traceback_and_exits_non_zero(own_source, tmp_path):
    json_path, image_folder = own_source
    malformed_json(json_path, image_folder)
    result = run_command("--dataset", "flickr8k", "--karpathy-json", json_path, "--image-folder", image_folder,
                         "--output-folder", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error:" in result.stderr and "dataset_flickr8k.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []



# ---------------------------------------------------------------- reliability (issue 11)

def folder_bytes(folder):
    """{file name: bytes} of a folder."""
    contents = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as file:
            contents[name] = file.read()
    return contents


def temp_files(folder):
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


def command_args(json_path, image_folder, output_folder, *extra):
    return ["--dataset", "flickr8k", "--karpathy-json", json_path, "--image-folder", image_folder,
            "--output-folder", str(output_folder), "--captions-per-image", str(CPI), "--min-word-freq", str(MIN_FREQ),
            "--max-len", str(MAX_LEN), "--image-size", str(SIZE), *extra]


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: "), result.stderr  # after any progress bar
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def run_limited(*args, file_size_limit):
    """The command line in a process whose files may not grow past `file_size_limit` bytes: writes past it
    fail with EFBIG, as on a full disk (SIGXFSZ ignored, so the write fails instead of killing the process)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, os.path.join(REPO, "create_input_files.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, preexec_fn=limit)


def output_folder_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    return tmp_path / "taken", "is a file"


def output_folder_under_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    return tmp_path / "taken" / "out", "not writable"


def output_folder_read_only(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "locked").mkdir(mode=0o555)
    return tmp_path / "locked", "not writable"


@pytest.mark.parametrize("bad_folder", [output_folder_is_a_file, output_folder_under_a_file, output_folder_read_only])
def test_an_unwritable_output_folder_is_refused_before_any_work(source, tmp_path, monkeypatch, bad_folder):
    folder, problem = bad_folder(tmp_path)
    monkeypatch.setattr(cif, "load_karpathy_json", lambda *args: pytest.fail("work started"))
    with pytest.raises(ToolkitError, match=f"--output-folder.*{re.escape(repr(str(folder)))}.*{problem}"):
        make_files(*source, str(folder))
    result = run_command("--dataset", "shapes", "--output-folder", str(folder), "--shapes-train", "2")
    assert_clean_error(result, str(folder), problem)
    assert "shapes images" not in result.stderr  # refused before the shapes were generated


def test_too_little_free_space_is_refused_before_any_work(source, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cif, "decode_images", lambda *args: pytest.fail("work started"))
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda folder: usage(10 ** 9, 10 ** 9 - 5000, 5000))
    with pytest.raises(ToolkitError, match=r"the 12 images and captions needs .* but .*out.* has only 5\.0 kB free"):
        make_files(*source, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_a_full_disk_while_writing_images_names_the_file_and_keeps_the_earlier_files(made, source, tmp_path):
    shutil.copytree(made[0], tmp_path / "out")
    before = folder_bytes(tmp_path / "out")
    result = run_limited(*command_args(*source, tmp_path / "out", "--overwrite", "--workers", "1"),
                         file_size_limit=8000)  # below one split's 4 x 3 x 32 x 32 bytes of images
    images_needed = utils.format_bytes(4 * 3 * SIZE * SIZE)
    assert_clean_error(result, "the disk is full", f"TRAIN_IMAGES_{BASE}.hdf5", f"needs about {images_needed}")
    assert folder_bytes(tmp_path / "out") == before  # the earlier run's files, intact; no temporary file


def test_images_with_an_empty_sentences_list_are_named_in_a_warning(own_source, tmp_path):
    json_path, image_folder = own_source
    def empty_two(data):
        data["images"][0]["sentences"] = []
        data["images"][5]["sentences"] = []
    edit_json(json_path, empty_two)
    with pytest.warns(UserWarning, match=r"2 image\(s\) .* empty 'sentences' list .*: 0000_RGB.jpg, 0005_I16.png"):
        summary = make_files(json_path, image_folder, str(tmp_path / "out"))
    assert summary["images"] == {"TRAIN": 3, "VAL": 3, "TEST": 4}


def test_reserved_tokens_in_sentences_are_encoded_as_unk(own_source, tmp_path):
    json_path, image_folder = own_source
    reserved = ["<unk>", "<start>", "<end>", "<pad>"]
    def add_reserved_tokens(data):
        for image in data["images"]:
            for sentence in image["sentences"]:
                sentence["tokens"] = reserved + sentence["tokens"][:MAX_LEN - len(reserved)]
    edit_json(json_path, add_reserved_tokens)
    make_files(json_path, image_folder, str(tmp_path / "out"))
    word_map = read(str(tmp_path / "out"), "WORDMAP")
    assert sorted(word_map.values()) == list(range(len(word_map)))  # no two tokens share an id
    assert word_map["<pad>"] == 0 and [word_map[token] for token in reserved[:3]] == \
        [len(word_map) - 3, len(word_map) - 2, len(word_map) - 1]
    unknown = word_map["<unk>"]
    for caption in read(str(tmp_path / "out"), "CAPTIONS", "TRAIN"):
        assert caption[:5] == [word_map["<start>"], unknown, unknown, unknown, unknown]
    refs = read(str(tmp_path / "out"), "REFS", "TRAIN")
    assert refs[0]["references"][0][:4] == reserved  # the references keep the original tokens


def test_objects_of_the_split_file_are_carried_into_refs(own_source, tmp_path):
    json_path, image_folder = own_source
    objects = [{"words": ["small", "red", "circle"], "box": [0.1, 0.2, 0.35, 0.5]},
               {"words": ["big", "blue", "square"], "box": [0.5, 0, 1, 1]}]
    edit_json(json_path, lambda data: data["images"][6].update(objects=objects))  # the third VAL image
    make_files(json_path, image_folder, str(tmp_path / "out"))
    refs = read(str(tmp_path / "out"), "REFS", "VAL")
    assert refs[2]["objects"] == objects and all("objects" not in entry for index, entry in enumerate(refs) if index != 2)


@pytest.mark.parametrize("objects", ["a circle", [{"words": ["red"], "box": [0, 0, 2, 1]}], [{"box": [0, 0, 1, 1]}]])
def test_malformed_objects_are_refused(own_source, tmp_path, objects):
    json_path, image_folder = own_source
    edit_json(json_path, lambda data: data["images"][3].update(objects=objects))
    with pytest.raises(ToolkitError, match=r"image 3 \(0003_CMYK.jpg\) has 'objects' that is not a list"):
        make_files(json_path, image_folder, str(tmp_path / "out"))


def test_exif_orientation_and_16_bit_grey_are_stored_as_load_image_reads_them(tmp_path):
    json_path, image_folder = write_tiny_karpathy(str(tmp_path / "source"), n_per_split=2,
                                                  modes=(("RGB", "PNG"), ("I;16", "PNG")))
    with open(json_path) as file:
        records = json.load(file)["images"]
    phone_photo = os.path.join(image_folder, records[0]["filename"])  # 48 x 36, stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    with Image.open(phone_photo) as image:
        upright = image.transpose(Image.Transpose.ROTATE_270)
        image.save(phone_photo, exif=exif)
    make_files(json_path, image_folder, str(tmp_path / "out"))
    stored, _ = read(str(tmp_path / "out"), "IMAGES", "TRAIN")
    np.testing.assert_array_equal(stored[0], np.asarray(upright.resize((SIZE, SIZE), images.RESAMPLE)).transpose(2, 0, 1))
    grey16 = os.path.join(image_folder, records[1]["filename"])
    np.testing.assert_array_equal(stored[1], images.load_image(grey16, SIZE))
    with Image.open(grey16) as image:
        assert image.mode.startswith("I") and np.asarray(image).max() > 255
        expected = np.asarray(image) // 256  # scaled to 8 bits, not clipped at 255
    assert np.abs(stored[1][0].astype(int) - np.asarray(Image.fromarray(expected.astype(np.uint8)).resize(
        (SIZE, SIZE), images.RESAMPLE))).max() == 0


def test_a_worker_that_dies_is_an_error_not_a_hang(source, tmp_path, monkeypatch):
    monkeypatch.setattr(cif, "IMAGES_PER_CHUNK", 1)
    splits = cif.split_images(cif.load_karpathy_json(source[0], "flickr8k"), "flickr8k", source[1], MAX_LEN)
    decoded = cif.decode_images([image for split in SPLITS for image in splits[split]], SIZE, 2)  # 12 chunks
    next(decoded)
    for process in multiprocessing.active_children():
        if process.name.startswith("ForkServerProcess"):
            process.kill()
    with pytest.raises(ToolkitError, match="decoding worker process ended unexpectedly"):
        list(decoded)


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    """Enough large JPEGs that preprocessing them with two workers takes about a second."""
    return write_tiny_karpathy(str(tmp_path_factory.mktemp("slow_source")), n_per_split=120, image_size=(640, 480),
                               modes=(("RGB", "JPEG"),))


def train_images_written(output_folder):
    """Bytes in the temporary TRAIN images file (0 before it exists)."""
    names = [name for name in temp_files(output_folder) if name.startswith(".TRAIN_IMAGES")]
    return os.path.getsize(os.path.join(output_folder, names[0])) if names else 0


def start_and_signal(json_path, image_folder, output_folder, signal_number, whole_group=False):
    """Start the command line with two workers, send `signal_number` (to its process group, as a terminal's
    Ctrl-C does, if `whole_group`) once it writes the TRAIN images; return the finished process's
    (return code, stderr)."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "create_input_files.py"),
                                *command_args(json_path, image_folder, output_folder, "--workers", "2")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while train_images_written(output_folder) < 10 * 3 * SIZE * SIZE and process.poll() is None:
        assert time.monotonic() < deadline, "preprocessing did not start"
        time.sleep(0.005)  # until the workers run and the first 10 TRAIN images are stored
    if whole_group:
        os.killpg(process.pid, signal_number)
    else:
        process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)  # returns once the workers, which share stderr, are gone too
    return process.returncode, stderr


@pytest.mark.parametrize("signal_number, whole_group, returncode, message", [
    (signal.SIGTERM, False, 143, "terminated (SIGTERM)"), (signal.SIGTERM, True, 143, "terminated (SIGTERM)"),
    (signal.SIGINT, True, 130, "interrupted")])
def test_sigterm_and_ctrl_c_end_cleanly_with_no_temporary_files(slow_source, tmp_path, signal_number, whole_group,
                                                                returncode, message):
    (tmp_path / "out").mkdir()
    status, stderr = start_and_signal(*slow_source, tmp_path / "out", signal_number, whole_group)
    assert status == returncode, stderr
    assert message in stderr and "Traceback" not in stderr and "Error" not in stderr
    assert os.listdir(tmp_path / "out") == []


def test_after_a_kill_9_the_next_run_removes_the_leftovers_and_says_so(slow_source, tmp_path):
    (tmp_path / "out").mkdir()
    returncode, stderr = start_and_signal(*slow_source, tmp_path / "out", signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    assert "Traceback" not in stderr and "Error" not in stderr  # the workers ended quietly
    leftovers = temp_files(tmp_path / "out")
    assert leftovers and leftovers == os.listdir(tmp_path / "out")
    result = run_command(*command_args(*slow_source, tmp_path / "out", "--workers", "2"))
    assert result.returncode == 0, result.stderr
    assert f"removed {len(leftovers)} temporary file(s)" in result.stdout and leftovers[0] in result.stdout
    assert temp_files(tmp_path / "out") == [] and len(os.listdir(tmp_path / "out")) == 13
