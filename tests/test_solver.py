"""Training, checkpoints, resume, testing and captioning on tiny shapes data, from Python."""
import json
import multiprocessing
import os
import pickle
import shutil

import pytest
import torch

import config
import metrics
import solver
import training_stages
from models import build_decoder
from conftest import tiny_cfg
from datasets import ImageCaptionsDataset, load_word_map
from images import normalize_images
from models import Encoder
from chair import NO_OBJECT_LISTS
from checkpoints import load_checkpoint
from utils import ToolkitError


def train_tiny(data, folder, **overrides):
    return solver.train(tiny_cfg(data, folder, **overrides))


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    """One short attention run shared by the read-only tests below."""
    folder = tmp_path_factory.mktemp("trained")
    return train_tiny(tiny_shapes, folder, decoder="attention", epochs=2)


def test_checkpoints_are_named_per_run_and_load_safely(trained, tiny_shapes):
    name = f"{tiny_shapes.data_name}_attention_resnet18"
    assert os.path.basename(trained["last_checkpoint"]) == f"checkpoint_{name}.pth.tar"
    assert os.path.basename(trained["best_checkpoint"]) == f"BEST_checkpoint_{name}.pth.tar"
    checkpoint = torch.load(trained["last_checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert checkpoint["history"]["epoch"] == [0, 1]
    assert len(checkpoint["history"]["val_bleu4"]) == 2
    assert checkpoint["word_map"]["<pad>"] == 0 and "circle" in checkpoint["word_map"]
    assert checkpoint["cfg"]["decoder"] == "attention" and checkpoint["cfg"]["encoder"] == "resnet18"
    assert {"encoder_state", "decoder_state", "decoder_optimizer"} <= set(checkpoint)


def test_decoders_share_a_folder_without_overwriting(tiny_shapes, tmp_path):
    for decoder in ("rnn", "adaptive"):
        train_tiny(tiny_shapes, tmp_path, decoder=decoder)
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("BEST_")] == [
        f"BEST_checkpoint_{tiny_shapes.data_name}_adaptive_resnet18.pth.tar",
        f"BEST_checkpoint_{tiny_shapes.data_name}_rnn_resnet18.pth.tar"]


def test_fresh_run_refuses_to_replace_an_earlier_best(tiny_shapes, tmp_path):
    train_tiny(tiny_shapes, tmp_path)
    with pytest.raises(ToolkitError, match="already holds a run"):
        train_tiny(tiny_shapes, tmp_path)
    train_tiny(tiny_shapes, tmp_path, overwrite=True)


def test_course_attention_switch_maps_to_decoder(tiny_shapes, tmp_path):
    assert config.validate_cfg(tiny_cfg(tiny_shapes, tmp_path, attention=True))["decoder"] == "attention"
    assert config.validate_cfg(tiny_cfg(tiny_shapes, tmp_path))["decoder"] == "rnn"
    with pytest.raises(ToolkitError, match="contradicts"):
        config.validate_cfg(tiny_cfg(tiny_shapes, tmp_path, attention=False, decoder="adaptive"))


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", 0.1, "unknown cfg key"),
    ("epochs", "10", "cfg\\['epochs'\\] = '10' has type str"),
    ("fine_tune_encoder", 1, "cfg\\['fine_tune_encoder'\\] = 1 has type int"),
    ("batch_size", True, "cfg\\['batch_size'\\] = True has type bool"),
    ("decoder", "lstm", "use one of rnn, attention, adaptive"),
    ("device", "gpu", "cfg\\['device'\\] = 'gpu' is not a torch device"),
    ("decoder_lr", -1e-4, "cfg\\['decoder_lr'\\] = -0.0001 must be a positive, finite learning rate"),
    ("decoder_lr", float("nan"), "cfg\\['decoder_lr'\\] = nan must be a positive, finite"),
    ("workers", -1, "cfg\\['workers'\\] = -1 must be 0 or more"),
    ("lr_decay_patience", 0, "cfg\\['lr_decay_patience'\\] = 0 must be at least 1"),
    ("grad_clip", -5.0, "cfg\\['grad_clip'\\] = -5.0 must be positive"),
    ("start_epoch", 1, "cfg\\['start_epoch'\\] = 1 leaves nothing to train: epochs = 1"),
])
def test_bad_cfg_is_refused_before_anything_runs(tiny_shapes, tmp_path, key, value, message):
    with pytest.raises(ToolkitError, match=message):
        solver.train(tiny_cfg(tiny_shapes, tmp_path / "out", **{key: value}))
    assert not os.path.exists(tmp_path / "out")


def test_a_finished_run_leaves_no_loader_worker_running(tiny_shapes, tmp_path):
    """Persistent workers left to the garbage collector miss their shutdown signal and each hangs for 5 s."""
    solver.train(tiny_cfg(tiny_shapes, tmp_path, decoder="rnn", workers=2))
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("fine_tune, workers", [(False, 2), (True, 0)])
def test_resume_ends_in_the_same_state_as_an_uninterrupted_run(tiny_shapes, tmp_path, fine_tune, workers):
    options = {"decoder": "attention", "fine_tune_encoder": fine_tune, "deterministic": True, "workers": workers}
    straight = train_tiny(tiny_shapes, tmp_path / "straight", epochs=2, **options)
    first = train_tiny(tiny_shapes, tmp_path / "resumed", epochs=1, **options)
    after_first_epoch = load_checkpoint(first["last_checkpoint"])["encoder_state"]
    resumed = train_tiny(tiny_shapes, tmp_path / "resumed", epochs=2, checkpoint=first["last_checkpoint"], **options)
    a, b = load_checkpoint(straight["last_checkpoint"]), load_checkpoint(resumed["last_checkpoint"])
    for key in ("encoder_state", "decoder_state"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    optimizers = ["decoder_optimizer"] + (["encoder_optimizer"] if fine_tune else [])
    assert (a["encoder_optimizer"] is None) == (b["encoder_optimizer"] is None) == (not fine_tune)
    for optimizer in optimizers:
        assert a[optimizer]["state"].keys() == b[optimizer]["state"].keys()
        for index, state in a[optimizer]["state"].items():
            assert torch.equal(state["exp_avg"], b[optimizer]["state"][index]["exp_avg"])
    assert a["history"]["val_loss"] == b["history"]["val_loss"]
    assert a["epoch"] == b["epoch"] == 1
    encoder_moved = any(not torch.equal(after_first_epoch[n], a["encoder_state"][n]) for n in after_first_epoch)
    assert encoder_moved == fine_tune


@pytest.mark.parametrize("decoder", ["rnn", "attention", "adaptive"])
def test_each_decoder_overfits_a_handful_of_images(tiny_shapes, decoder):
    """One caption for each of 4 images, fixed encodings: the training loss goes to nearly zero."""
    torch.manual_seed(0)
    dataset = ImageCaptionsDataset(tiny_shapes.folder, tiny_shapes.data_name, "TRAIN")
    images, captions, lengths = (torch.stack(items) for items in zip(*[dataset[i] for i in range(4)]))
    encoder = Encoder(4, "resnet18", weights=None).eval()
    with torch.no_grad():
        encoder_out = encoder(normalize_images(images))  # (4, 4, 4, 512)
    cfg = config.validate_cfg({"data_folder": "x", "data_name": "y", "decoder": decoder, "embed_dim": 64,
                               "attention_dim": 64, "decoder_dim": 64, "dropout": 0.0})
    vocab_size = len(load_word_map(tiny_shapes.folder, tiny_shapes.data_name))
    model = build_decoder(cfg, vocab_size, encoder.encoder_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        scores, sorted_captions, decode_lengths, alphas, _ = model(encoder_out, captions[:, 0], lengths[:, 0])
        loss, _, _ = training_stages.caption_loss(scores, sorted_captions[:, 1:], decode_lengths, alphas, 0.0, False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_grouped_batch_gives_the_per_caption_loss(tiny_shapes):
    """B images with all their captions, encodings expanded, equals one image copy per caption."""
    torch.manual_seed(0)
    dataset = ImageCaptionsDataset(tiny_shapes.folder, tiny_shapes.data_name, "TRAIN")
    images, captions, lengths = (torch.stack(items) for items in zip(*[dataset[i] for i in range(3)]))
    encoder_out = Encoder(4, "resnet18", weights=None).eval()(normalize_images(images)).detach()
    cfg = config.validate_cfg({"data_folder": "x", "data_name": "y", "attention": True, "embed_dim": 32,
                               "attention_dim": 32, "decoder_dim": 32})
    decoder = build_decoder(cfg, 200, 512).train()
    decoder.dropout.p = 0.0
    flat_captions, flat_lengths = captions.reshape(15, -1), lengths.reshape(15)
    image_of_caption = torch.arange(3).repeat_interleave(5)

    def loss_of(*inputs):
        scores, sorted_captions, decode_lengths, alphas, _ = decoder(*inputs)
        return training_stages.caption_loss(scores, sorted_captions[:, 1:], decode_lengths, alphas, 1.0, True)[0]

    grouped = loss_of(encoder_out, flat_captions, flat_lengths, image_of_caption)
    per_caption = loss_of(encoder_out[image_of_caption], flat_captions, flat_lengths)
    torch.testing.assert_close(grouped, per_caption, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_shapes, tmp_path, monkeypatch):
    first = train_tiny(tiny_shapes, tmp_path, epochs=1)
    before = open(first["last_checkpoint"], "rb").read()
    real_loss = training_stages.caption_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss, scores, targets = real_loss(*args)
        return (loss * float("nan") if calls["n"] == 2 else loss), scores, targets

    monkeypatch.setattr(training_stages, "caption_loss", poisoned)
    with pytest.raises(ToolkitError, match=r"at epoch 1, batches 0 to \d+ became nan"):
        train_tiny(tiny_shapes, tmp_path, epochs=2, checkpoint=first["last_checkpoint"])
    assert open(first["last_checkpoint"], "rb").read() == before


def test_test_prints_and_returns_bleu_and_writes_predictions(trained, tmp_path, capsys):
    out = tmp_path / "predictions.json"
    scores = solver.test(trained["best_checkpoint"], beam_size=2, predictions_json=str(out), coco_metrics=False)
    assert set(scores) - {"peak_in_box", "mass_in_box", "uniform_mass_in_box", "chair_i", "chair_s"} == {
        "bleu1", "bleu2", "bleu3", "bleu4"}
    printed = capsys.readouterr().out
    for n in range(1, 5):
        assert f"BLEU-{n}: {scores[f'bleu{n}']:.4f}" in printed
    predictions = json.loads(out.read_text())
    assert len(predictions) == 8
    assert all(p["image_id"].startswith("shapes_") and isinstance(p["caption"], str) for p in predictions)


@pytest.fixture
def without_java(monkeypatch, tmp_path):
    """No `java` on PATH (an empty folder), as metrics detects it; the real one detected again afterwards."""
    monkeypatch.setenv("PATH", str(tmp_path))
    metrics.java_unavailable_reason.cache_clear()
    yield
    metrics.java_unavailable_reason.cache_clear()


def test_test_without_java_scores_with_the_python_tokenizer_and_says_so(trained, without_java, capsys):
    scores = solver.test(trained["best_checkpoint"], beam_size=2)
    assert scores["ptb_tokenizer"] == "python"
    assert {"coco_bleu4", "rouge_l", "cider"} <= set(scores) and "meteor" not in scores
    printed = capsys.readouterr().out.splitlines()
    assert "PTB tokenizer: python" in printed
    assert any(line.startswith("METEOR: unavailable (Java was not found on PATH") for line in printed)


def test_test_refuses_the_java_tokenizer_without_java_before_any_work(without_java, tmp_path):
    with pytest.raises(ToolkitError, match="the Java PTB tokenizer cannot run: Java was not found on PATH"):
        solver.test(str(tmp_path / "not_read.pth.tar"), tokenizer="java")
    args = solver.build_parser().parse_args(["test", "--checkpoint", "c", "--tokenizer", "python"])
    assert args.tokenizer == "python"


def test_blind_test_decodes_one_caption_for_every_image(trained, tmp_path):
    out = tmp_path / "blind.json"
    solver.test(trained["best_checkpoint"], beam_size=2, predictions_json=str(out), blind=True, coco_metrics=False)
    assert len({p["caption"] for p in json.loads(out.read_text())}) == 1


def test_caption_names_an_unreadable_image_and_goes_on(trained, tiny_shapes, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = os.path.join(tiny_shapes.folder, "shapes_images", "shapes_000000.jpg")
    results = solver.caption(trained["best_checkpoint"], [str(bad), good], beam_size=2)
    assert results[0]["caption"] is None and "broken.jpg" in results[0]["error"]
    assert "broken.jpg" in capsys.readouterr().err
    assert isinstance(results[1]["caption"], str)
    assert results[1]["alphas"].shape == (len(results[1]["seq"]) - 1, 16)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ToolkitError, match="does not exist"):
        solver.test(str(tmp_path / "missing.pth.tar"))
    foreign = tmp_path / "foreign.pth.tar"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ToolkitError, match="not a checkpoint of this toolkit"):
        solver.test(str(foreign))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickled_payload_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as file:
        pickle.dump({"format": "captioning-toolkit/1", "payload": RunsCode()}, file, protocol=2)
    with pytest.raises(ToolkitError, match="not a checkpoint of this toolkit"):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


def test_word_map_mismatch_is_refused(trained, tiny_shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes.folder, data)
    word_map_path = data / f"WORDMAP_{tiny_shapes.data_name}.json"
    word_map = json.loads(word_map_path.read_text())
    word_map["zebra"] = len(word_map)
    word_map_path.write_text(json.dumps(word_map))
    with pytest.raises(ToolkitError, match="word map of checkpoint .* differs"):
        solver.test(trained["best_checkpoint"], data_folder=str(data), coco_metrics=False)


def test_missing_data_files_name_the_path_and_the_command(tmp_path):
    with pytest.raises(ToolkitError, match="WORDMAP_shapes_5_cap_per_img_5_min_word_freq.json.*create_input_files.py "
                                           "--dataset shapes"):
        solver.train({"data_folder": str(tmp_path), "data_name": "shapes_5_cap_per_img_5_min_word_freq"})


def test_per_caption_training_still_works(tiny_shapes, tmp_path):
    result = train_tiny(tiny_shapes, tmp_path, decoder="attention", group_captions=False)
    assert len(result["history"]["val_bleu4"]) == 1
    assert not [name for name in os.listdir(tmp_path) if "FEATURES" in name]


def test_test_scores_the_grounding_of_attention_on_data_with_boxes(trained, tmp_path):
    out = tmp_path / "predictions.json"
    scores = solver.test(trained["best_checkpoint"], beam_size=2, predictions_json=str(out), coco_metrics=False)
    predictions = json.loads(out.read_text())
    masses = [p["mass_in_box"] for p in predictions if p["mass_in_box"] is not None]
    assert masses, "the trained model names a shape of its image in some captions"
    assert 0 <= scores["mass_in_box"] <= 1 and 0 <= scores["peak_in_box"] <= 1
    assert 0 < scores["uniform_mass_in_box"] < 1  # the share of the image the named boxes cover
    assert min(masses) <= scores["mass_in_box"] <= max(masses)


def test_test_skips_clip_scores_with_one_note_without_their_weights(trained, monkeypatch, capsys):
    monkeypatch.setattr("clip_score.cached_weights_file", lambda name, tag: None)  # offline: never a download
    scores = solver.test(trained["best_checkpoint"], beam_size=2, clip_metric_model="ViT-B-32:openai")
    notes = [line for line in capsys.readouterr().out.splitlines() if "CLIP-S" in line]
    assert len(notes) == 1 and notes[0].startswith("CLIP-S / RefCLIP-S: unavailable (")
    assert "cider" in scores and "clip_s" not in scores


def test_test_reports_chair_on_shapes_data(trained, tmp_path, capsys):
    out = tmp_path / "predictions.json"
    scores = solver.test(trained["best_checkpoint"], beam_size=2, predictions_json=str(out), coco_metrics=False)
    printed = capsys.readouterr().out
    assert f"CHAIR-i: {scores['chair_i']:.4f}" in printed and f"CHAIR-s: {scores['chair_s']:.4f}" in printed
    hallucinated = [p["hallucinated"] for p in json.loads(out.read_text())]
    assert all(isinstance(names, list) for names in hallucinated)
    assert scores["chair_s"] == sum(map(bool, hallucinated)) / len(hallucinated)


def test_test_says_in_one_line_that_data_without_object_lists_has_no_chair(trained, tiny_shapes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes.folder, data)
    refs_path = data / f"TEST_REFS_{tiny_shapes.data_name}.json"
    entries = json.loads(refs_path.read_text())
    refs = [{key: value for key, value in entry.items() if key != "objects"} for entry in entries]
    refs_path.write_text(json.dumps(refs))
    scores = solver.test(trained["best_checkpoint"], beam_size=2, data_folder=str(data), coco_metrics=False)
    assert "chair_i" not in scores and "chair_s" not in scores
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CHAIR")]
    assert lines == [f"CHAIR: unavailable ({NO_OBJECT_LISTS})"]
    assert "--instances" in NO_OBJECT_LISTS


def test_instances_on_shapes_data_are_refused(trained, tmp_path):
    with pytest.raises(ToolkitError, match="lists its own objects \\(shapes\\): drop --instances"):
        solver.test(trained["best_checkpoint"], coco_metrics=False, instances=str(tmp_path / "instances.json"))
