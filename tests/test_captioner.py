"""The Captioner (against beam_search on the same inputs, bad images in a batch, the decoding options from the
command line), ensembles of checkpoints, the encoder pass in every layout and chunk size it may pick, and checkpoints
of an earlier version of the toolkit."""
import inspect
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import captioner as captioner_module
import config
import encoding
import solver
from backbones import BACKBONES
from beam_search import beam_search
from captioner import Captioner, load_models, read_image
from checkpoints import load_checkpoint, save_checkpoint
from conftest import tiny_cfg
from images import normalize_images
from models import DECODERS, Encoder, build_decoder, uninitialised
from utils import ToolkitError


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    """One short adaptive-attention run (its captions carry alphas and betas)."""
    return solver.train(tiny_cfg(tiny_shapes, tmp_path_factory.mktemp("captioner"), decoder="adaptive"))


def shapes_images(data, count):
    return [os.path.join(data.folder, "shapes_images", f"shapes_{index:06d}.jpg") for index in range(count)]


def test_captioner_gives_beam_search_captions_for_paths_pil_images_and_tensors(trained, tiny_shapes):
    captioner = Captioner.from_checkpoint(trained["best_checkpoint"], device="cpu")
    paths = shapes_images(tiny_shapes, 3)
    pixels = torch.stack([read_image(path, captioner.image_size) for path in paths])  # (3, 3, S, S) uint8
    with torch.inference_mode():
        encoder_out = captioner.encoder(normalize_images(pixels))  # the plain encoder, one call
    word_map = captioner.word_map
    expected = beam_search(captioner.decoder, encoder_out, word_map["<start>"], word_map["<end>"], 3, 20)
    with Image.open(paths[1]) as image:
        sources = [paths[0], image.copy(), pixels[2]]
    results = captioner.caption(sources, beam_size=3, max_steps=20, batch_size=2)  # two batches: 2 + 1
    assert [result["seq"] for result in results] == [found.words for found in expected]
    assert [result["score"] for result in results] == pytest.approx([found.score for found in expected], abs=1e-4)
    assert [result["path"] for result in results] == [paths[0], None, None]
    words = {index: word for word, index in word_map.items()}
    for result in results:
        assert result["words"] == [words[w] for w in result["seq"]] and result["error"] is None
        assert result["caption"] == " ".join(w for w in result["words"] if w not in ("<start>", "<end>", "<pad>"))
        steps = len(result["seq"]) - 1  # generated words: all but <start>
        assert result["alphas"].shape == (steps, 16) and result["betas"].shape == (steps,)


def test_a_bad_image_is_reported_and_the_others_are_captioned(trained, tiny_shapes, tmp_path, capsys):
    captioner = Captioner.from_checkpoint(trained["best_checkpoint"], device="cpu")
    good = shapes_images(tiny_shapes, 2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    alone = captioner.caption(good, beam_size=2)
    mixed = captioner.caption([good[0], str(broken), torch.zeros(3, 8, dtype=torch.uint8), good[1]], beam_size=2)
    assert mixed[1]["caption"] is None and "broken.jpg" in mixed[1]["error"]
    assert mixed[2]["caption"] is None and "uint8 shaped (3, H, W)" in mixed[2]["error"]
    assert "broken.jpg" in capsys.readouterr().err
    assert [mixed[0]["seq"], mixed[3]["seq"]] == [result["seq"] for result in alone]


def test_a_tensor_of_another_size_is_resized_like_a_file(trained, tiny_shapes):
    captioner = Captioner.from_checkpoint(trained["best_checkpoint"], device="cpu")
    path = shapes_images(tiny_shapes, 1)[0]
    with Image.open(path) as image:
        large = torch.from_numpy(np.array(image.convert("RGB").resize((96, 96)))).permute(2, 0, 1)
        from_pil = captioner.caption([image.resize((96, 96))], beam_size=2)
    assert captioner.caption([large], beam_size=2)[0]["seq"] == from_pil[0]["seq"]
    assert captioner.caption(large, beam_size=2)[0]["seq"] == from_pil[0]["seq"]  # one image, not a list
    assert len(captioner.caption(torch.stack([large, large]), beam_size=2)) == 2  # a batch tensor


def test_caption_writes_json_lines_and_figures_for_a_folder(trained, tiny_shapes, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for path in shapes_images(tiny_shapes, 2):
        Image.open(path).save(folder / os.path.basename(path))
    (folder / "notes.txt").write_text("not a picture")
    output, figures = tmp_path / "captions.jsonl", tmp_path / "figures"
    results = solver.caption(trained["best_checkpoint"], [str(folder)], beam_size=2, output=str(output),
                             figures=str(figures))
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["file"] for line in lines] == [os.path.join(str(folder), f"shapes_00000{i}.jpg") for i in range(2)]
    assert [(line["caption"], line["score"]) for line in lines] == [(r["caption"], r["score"]) for r in results]
    assert sorted(os.listdir(figures)) == ["shapes_000000.png", "shapes_000001.png"]


def test_the_captioner_gives_the_n_best_of_beam_search(trained, tiny_shapes):
    captioner = Captioner.from_checkpoint(trained["best_checkpoint"], device="cpu")
    paths = shapes_images(tiny_shapes, 2)
    options = {"length_penalty": 0.6, "block_trigrams": True, "n_best": 3}
    encoder_out = captioner.encode(torch.stack([read_image(path, captioner.image_size) for path in paths]))
    expected = beam_search(captioner.decoder, encoder_out, captioner.word_map["<start>"], captioner.word_map["<end>"],
                           3, 20, **options)
    results = captioner.caption(paths, beam_size=3, max_steps=20, **options)
    for result, found in zip(results, expected):
        assert [entry["seq"] for entry in result["n_best"]] == [caption.words for caption in found]
        assert [entry["ranking_score"] for entry in result["n_best"]] == pytest.approx(
            [caption.ranking_score for caption in found], abs=1e-4)
        assert result["n_best"][0]["caption"] == result["caption"] and result["n_best"][0]["seq"] == result["seq"]
    with pytest.raises(ToolkitError, match=r"n_best = 4 must be a whole number from 1 to beam_size \(3\)"):
        captioner.caption(paths, beam_size=3, n_best=4)


def test_the_decoding_options_reach_the_search_from_the_command_line(trained, tiny_shapes, tmp_path, monkeypatch):
    calls = []

    def recording(*args, **kwargs):
        calls.append(inspect.signature(beam_search).bind(*args, **kwargs).arguments)
        return beam_search(*args, **kwargs)

    monkeypatch.setattr(captioner_module, "beam_search", recording)
    options = ["--beam-size", "3", "--length-penalty", "0.6", "--block-trigrams", "--n-best", "2", "--device", "cpu"]
    predictions, lines = tmp_path / "predictions.json", tmp_path / "captions.jsonl"
    solver.main(["test", "--checkpoint", trained["best_checkpoint"], "--predictions-json", str(predictions),
                 "--no-coco-metrics", *options])
    solver.main(["caption", "--checkpoint", trained["best_checkpoint"], *shapes_images(tiny_shapes, 2),
                 "--output", str(lines), *options])
    assert calls and all((call["beam_size"], call["length_penalty"], call["block_trigrams"], call["n_best"]) ==
                         (3, 0.6, True, 2) for call in calls)
    written = json.loads(predictions.read_text()) + [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(written) == 8 + 2
    for entry in written:
        assert [set(ranked) for ranked in entry["n_best"]] == [{"caption", "score", "ranking_score"}] * 2
        assert entry["n_best"][0]["caption"] == entry["caption"]
        assert entry["n_best"][0]["ranking_score"] >= entry["n_best"][1]["ranking_score"]


def test_n_best_one_writes_what_it_always_did(trained, tmp_path):
    """The default predictions file has no n_best, and n_best = 2 keeps its captions."""
    default, two = tmp_path / "default.json", tmp_path / "two.json"
    solver.test(trained["best_checkpoint"], beam_size=3, predictions_json=str(default), coco_metrics=False)
    solver.test(trained["best_checkpoint"], beam_size=3, predictions_json=str(two), coco_metrics=False, n_best=2)
    default, two = json.loads(default.read_text()), json.loads(two.read_text())
    keys = ("image_id", "caption", "mass_in_box", "hallucinated")
    assert all(set(entry) == set(keys) for entry in default)
    assert [{key: entry[key] for key in keys} for entry in two] == default


# ---------------------------------------------------------------- ensembles


@pytest.fixture(scope="module")
def other(tiny_shapes, tmp_path_factory):
    """A second short run on the same data (so the same word map): the rnn decoder over a 3 x 3 grid."""
    return solver.train(tiny_cfg(tiny_shapes, tmp_path_factory.mktemp("ensemble"), decoder="rnn",
                                 encoded_image_size=3))


def edited_checkpoint(path, out, **entries):
    """A copy of checkpoint `path` with `entries` replaced, written to `out`."""
    save_checkpoint(dict(load_checkpoint(path), **entries), out)
    return str(out)


def test_an_ensemble_of_one_checkpoint_is_that_checkpoint(trained, tiny_shapes):
    one = Captioner.from_checkpoints([trained["best_checkpoint"]], device="cpu")
    alone = Captioner.from_checkpoint(trained["best_checkpoint"], device="cpu")
    paths = shapes_images(tiny_shapes, 3)
    assert type(one) is Captioner
    found, expected = one.caption(paths), alone.caption(paths)
    assert [(r["seq"], r["score"]) for r in found] == [(r["seq"], r["score"]) for r in expected]


def test_an_ensemble_encodes_with_each_model_at_its_image_size_and_searches_as_one(trained, other, tiny_shapes,
                                                                                  tmp_path):
    smaller = edited_checkpoint(other["best_checkpoint"], tmp_path / "smaller.pth.tar", image_size=48)
    ensemble = Captioner.from_checkpoints([trained["best_checkpoint"], smaller], device="cpu")
    assert ensemble.image_sizes == [64, 48] and len(ensemble.decoder.decoders) == 2
    paths = shapes_images(tiny_shapes, 3)
    pixels = [torch.stack([read_image(path, size) for path in paths]) for size in (64, 48)]  # (3, 3, S_m, S_m)
    with torch.inference_mode():
        encodings = tuple(encoder(normalize_images(images)) for encoder, images in zip(ensemble.encoders, pixels))
    assert [tuple(encoder_out.shape[1:3]) for encoder_out in encodings] == [(4, 4), (3, 3)]  # each model's grid
    word_map = ensemble.word_map
    expected = beam_search(ensemble.decoder, encodings, word_map["<start>"], word_map["<end>"], 3, 20)
    results = ensemble.caption(paths, beam_size=3, max_steps=20, batch_size=2)
    assert [result["seq"] for result in results] == [found.words for found in expected]
    assert [result["score"] for result in results] == pytest.approx([found.score for found in expected], abs=1e-4)
    for result in results:  # the first model's attention, over its 4 x 4 grid
        steps = len(result["seq"]) - 1
        assert result["grid"] == 4 and result["alphas"].shape == (steps, 16) and result["betas"].shape == (steps,)


def test_checkpoints_with_other_word_maps_are_refused_before_any_model_is_built(trained, other, tmp_path,
                                                                                monkeypatch):
    word_map = load_checkpoint(other["best_checkpoint"])["word_map"]
    first, second = sorted(word for word in word_map if not word.startswith("<"))[:2]
    swapped = edited_checkpoint(other["best_checkpoint"], tmp_path / "swapped.pth.tar",
                                word_map=dict(word_map, **{first: word_map[second], second: word_map[first]}))
    monkeypatch.setattr(captioner_module, "load_models", lambda *args: pytest.fail("a model was built"))
    with pytest.raises(ToolkitError, match="have different word maps") as refused:
        Captioner.from_checkpoints([trained["best_checkpoint"], other["best_checkpoint"], swapped], device="cpu")
    assert f"{trained['best_checkpoint']!r} and {swapped!r}" in str(refused.value)
    assert "2 words of the first are missing from the second or have another index" in str(refused.value)


# ---------------------------------------------------------------- the encoder pass


@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last))
@pytest.mark.parametrize("chunk_size", (1, 3, 16))
def test_every_plan_encodes_like_the_plain_encoder(memory_format, chunk_size):
    torch.manual_seed(0)
    encoder = Encoder(4, "resnet18", weights=None).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        expected = encoder(normalize_images(images))  # (5, 4, 4, 512)
    got = encoding.encode_images(encoder, images, encoding.EncodingPlan(memory_format, chunk_size))
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_features_are_within_tolerance_of_float32():
    """The CUDA plan's bf16 autocast (run here on the CPU, which has bf16 autocast too) against float32."""
    torch.manual_seed(0)
    encoder = Encoder(4, "resnet18", weights=None).eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    full = encoding.encode_images(encoder, images, encoding.EncodingPlan(torch.channels_last, 4))
    half = encoding.encode_images(encoder, images, encoding.EncodingPlan(torch.channels_last, 4, torch.bfloat16))
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # bf16 did run
    relative = (half - full).norm() / full.norm()
    assert relative < 0.02, relative
    cosine = torch.nn.functional.cosine_similarity(half.flatten(1), full.flatten(1))
    assert cosine.min() > 0.999


def test_the_plans_are_fixed_per_device():
    cpu = encoding.inference_plan("cpu", 50)
    assert (cpu.memory_format, cpu.chunk_size, cpu.autocast_dtype) == (torch.channels_last, 4, None)
    assert encoding.inference_plan("cpu", 2).chunk_size == 2
    if torch.cuda.is_available():
        cuda = encoding.inference_plan("cuda", 50)
        assert cuda.chunk_size == 50 and cuda.autocast_dtype in (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- checkpoints of an earlier version

NEWER_KEYS = ("training", "scst_lr", "scst_samples", "scst_baseline", "val_metric", "max_steps", "lr_warmup_steps",
              "mixed_precision", "channels_last")


def old_checkpoint(path, out):
    """A copy of checkpoint `path` as an earlier version wrote it: no format_version, cfg without NEWER_KEYS."""
    checkpoint = load_checkpoint(path)
    del checkpoint["format_version"]
    checkpoint["cfg"] = {key: value for key, value in checkpoint["cfg"].items() if key not in NEWER_KEYS}
    torch.save(checkpoint, out)
    return str(out)


def test_an_old_checkpoint_tests_captions_and_resumes(trained, tiny_shapes, tmp_path, capsys):
    old = old_checkpoint(trained["last_checkpoint"], tmp_path / "old.pth.tar")
    assert "scst_lr" in load_checkpoint(trained["last_checkpoint"])["cfg"]
    image = shapes_images(tiny_shapes, 1)
    assert solver.caption(old, image, beam_size=2)[0]["seq"] == solver.caption(
        trained["last_checkpoint"], image, beam_size=2)[0]["seq"]
    solver.compare([old], beam_size=2, coco_metrics=False)
    out = capsys.readouterr().out
    assert out.count("was written by an earlier version of the toolkit") == 1
    assert "scst_lr=" in out and "val_metric=None" in out
    resumed = solver.train(tiny_cfg(tiny_shapes, tmp_path / "resumed", decoder="adaptive", epochs=2, checkpoint=old))
    assert load_checkpoint(resumed["last_checkpoint"])["epoch"] == 1


def test_a_checkpoint_of_a_newer_format_is_refused(trained, tmp_path):
    checkpoint = load_checkpoint(trained["last_checkpoint"])
    checkpoint["format_version"] += 1
    newer = tmp_path / "newer.pth.tar"
    torch.save(checkpoint, newer)
    with pytest.raises(ToolkitError, match="newer version of this toolkit"):
        Captioner.from_checkpoint(str(newer))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_encoder_is_filled_entirely_by_its_state_dict(backbone):
    """Models for inference are built uninitialised and filled by load_state_dict: that needs every buffer to be
    in the state_dict (a non-persistent one would keep uninitialised memory)."""
    encoder = uninitialised(lambda: Encoder(4, backbone, weights=None), "meta")
    state = encoder.state_dict()
    assert {name for name, _ in encoder.named_buffers()} <= set(state)
    assert {name for name, _ in encoder.named_parameters()} <= set(state)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_every_decoder_is_filled_entirely_by_its_state_dict(decoder):
    cfg = config.validate_cfg({"data_folder": "unused", "data_name": "unused", "decoder": decoder})
    model = uninitialised(lambda: build_decoder(cfg, 50, 64), "meta")
    assert {name for name, _ in model.named_buffers()} <= set(model.state_dict())


def test_a_loaded_captioner_equals_one_built_with_random_weights_then_loaded(trained):
    checkpoint = load_checkpoint(trained["best_checkpoint"])
    encoder, decoder = load_models(checkpoint, "cpu")
    for model, key in ((encoder, "encoder_state"), (decoder, "decoder_state")):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, checkpoint[key][name]), name
