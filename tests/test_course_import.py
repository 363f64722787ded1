"""Importing the course's checkpoints: pickled whole modules (trusted only) and state_dicts exports, mapped
onto this toolkit's models, captioning exactly like the course's modules on the same images."""
import json
import os

import pytest
import torch
from torch import nn

import course_import
import config
import models
import solver
from course_import import import_course_checkpoint
from beam_search import beam_search
from course_models import (COURSE_NORMALIZE, DecoderWithAttention, DecoderWithRNN, Encoder, course_beam_search,
                           randomize_batchnorm_statistics, save_course_checkpoint)
from datasets import ImageCaptionsDataset, load_word_map
from checkpoints import empty_history, load_checkpoint
from utils import ToolkitError
from vocabulary import strip_special

DIMS = {"embed_dim": 16, "attention_dim": 12, "decoder_dim": 24, "dropout": 0.3, "device": torch.device("cpu")}
MAX_STEPS = 12
TRAINER_KEYS = {"cfg", "word_map", "image_size", "encoder_state", "decoder_state", "encoder_optimizer",
                "decoder_optimizer", "epoch", "best_bleu4", "epochs_since_improvement", "history", "format",
                "format_version"}


@pytest.fixture(scope="module")
def course(tiny_shapes):
    """The course's modules with random weights: a 2 x 2 grid encoder with an attention decoder, and a decoder
    without attention for the same trunk at a 1 x 1 grid (course cfg: embed_dim = decoder_dim); and the TEST
    images' encodings at both grids."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vocab_size = len(load_word_map(tiny_shapes.folder, tiny_shapes.data_name))
    encoder = Encoder(encoded_image_size=2)
    attention = DecoderWithAttention(dict(DIMS, vocab_size=vocab_size))
    rnn = DecoderWithRNN(dict(DIMS, vocab_size=vocab_size, embed_dim=DIMS["decoder_dim"]), encoder_dim=2048)
    randomize_batchnorm_statistics(encoder, generator)
    for module in (encoder, attention, rnn):
        module.eval()
    with torch.no_grad():  # one trunk pass; the course's adaptive pools to 2 x 2 (as encoder) and 1 x 1
        features = encoder.resnet(COURSE_NORMALIZE(split_images(tiny_shapes).float() / 255.0))  # (N, 2048, 2, 2)
        encodings = encoder.adaptive_pool(features).permute(0, 2, 3, 1)  # (N, 2, 2, 2048), as encoder(images)
        grid1_encodings = nn.AdaptiveAvgPool2d((1, 1))(features).permute(0, 2, 3, 1)  # (N, 1, 1, 2048)
        image_inputs = rnn.init(grid1_encodings.reshape(len(features), -1))
        rnn.bn.running_mean.copy_(image_inputs.mean(dim=0))  # as training would leave them: captions then differ
        rnn.bn.running_var.copy_(image_inputs.var(dim=0))
    return {"encoder": encoder, "attention": attention, "rnn": rnn, "encodings": encodings,
            "grid1_encodings": grid1_encodings}


@pytest.fixture(scope="module")
def pickled_attention(course, tmp_path_factory):
    """A checkpoint as the course's train.py writes it, with a used Adam optimiser."""
    path = tmp_path_factory.mktemp("course") / "BEST_checkpoint_shapes.pth.tar"
    decoder = course["attention"]
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    decoder.fc(torch.ones(1, DIMS["decoder_dim"])).sum().backward()
    optimizer.step()  # gives the optimiser a state; the fc's weights change, the reference uses the same ones
    decoder.zero_grad(set_to_none=True)
    save_course_checkpoint(path, course["encoder"], decoder, epoch=6, epochs_since_improvement=2, bleu4=0.2792,
                           decoder_optimizer=optimizer)
    return str(path)


def export_state_dicts(path, encoder, decoder, **extra):
    """What the README's three lines write in the course's environment."""
    state = {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
             "encoded_image_size": encoder.enc_image_size, "epoch": 3, "epochs_since_improvement": 0,
             "bleu-4": 0.2671, **extra}
    torch.save(state, path)
    return str(path)


def split_images(data):
    dataset = ImageCaptionsDataset(data.folder, data.data_name, "TEST")
    return torch.stack([dataset[index][0] for index in range(len(dataset))])  # uint8 (N, 3, S, S)


def sentences(word_ids, word_map):
    words = {index: word for word, index in word_map.items()}
    return " ".join(words[index] for index in strip_special(word_ids, word_map))


def course_captions(decoder, encodings, word_map, beam_size):
    """The course's beam search on each image's (G, G, C) encoding -> caption strings."""
    return [sentences(course_beam_search(decoder, encoding.unsqueeze(0), word_map["<start>"], word_map["<end>"],
                                         beam_size, MAX_STEPS), word_map) for encoding in encodings]


def assert_same_captions(checkpoint, course_decoder, encodings):
    """This toolkit's beam search with the imported decoder, and the course's with its own, on the same
    encodings: the same captions, at beam sizes 1 and 3."""
    word_map = checkpoint["word_map"]
    decoder = models.build_decoder(checkpoint["cfg"], len(word_map), encodings.size(-1))
    decoder.load_state_dict(checkpoint["decoder_state"])
    decoder.eval()
    for beam_size in (1, 3):
        captions = beam_search(decoder, encodings, word_map["<start>"], word_map["<end>"], beam_size, MAX_STEPS)
        expected = course_captions(course_decoder, encodings, word_map, beam_size)
        assert [sentences(caption.words, word_map) for caption in captions] == expected
        assert len(set(expected)) > 1


def test_pickled_checkpoint_is_refused_without_trust(pickled_attention, tiny_shapes):
    with pytest.raises(ToolkitError) as error:
        import_course_checkpoint(pickled_attention, tiny_shapes.folder, tiny_shapes.data_name)
    message = str(error.value)
    assert "can run any code" in message and "trust_pickle=True" in message
    assert "ckpt['encoder'].state_dict()" in message and course_import.EXPORT_FILE in message


def test_trusted_pickle_imports_and_captions_like_the_course(pickled_attention, course, tiny_shapes, tmp_path,
                                                            capsys):
    out = import_course_checkpoint(pickled_attention, tiny_shapes.folder, tiny_shapes.data_name, trust_pickle=True)
    assert out == pickled_attention.replace(".pth.tar", ".toolkit.pth.tar")
    assert "fresh Adam optimisers" in capsys.readouterr().out
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    assert set(checkpoint) == TRAINER_KEYS and load_checkpoint(out).keys() == checkpoint.keys()
    cfg = checkpoint["cfg"]
    assert cfg.keys() == config.default_cfg().keys()
    assert (cfg["decoder"], cfg["attention"], cfg["encoder"], cfg["encoded_image_size"]) == ("attention", True,
                                                                                             "resnet101", 2)
    assert (cfg["embed_dim"], cfg["attention_dim"], cfg["decoder_dim"], cfg["dropout"]) == (16, 12, 24, 0.3)
    assert (checkpoint["epoch"], checkpoint["epochs_since_improvement"], checkpoint["best_bleu4"]) == (6, 2, 0.2792)
    assert checkpoint["decoder_optimizer"] is None and checkpoint["history"] == empty_history()
    assert checkpoint["image_size"] == 64
    assert torch.equal(checkpoint["decoder_state"]["attention.att.weight"],
                       course["attention"].attention.att.weight.detach())
    assert torch.equal(checkpoint["encoder_state"]["trunk.7.2.bn3.running_var"],
                       course["encoder"].resnet[7][2].bn3.running_var)
    predictions = tmp_path / "predictions.json"
    solver.test(out, beam_size=3, predictions_json=str(predictions), max_steps=MAX_STEPS, device="cpu",
                coco_metrics=False, workers=0)
    expected = course_captions(course["attention"], course["encodings"], checkpoint["word_map"], 3)
    assert [entry["caption"] for entry in json.loads(predictions.read_text())] == expected
    assert len(set(expected)) > 1 and all(expected)  # the images get different, non-empty captions
    assert_same_captions(checkpoint, course["attention"], course["encodings"])


def test_state_dicts_export_imports_without_pickle(course, tiny_shapes, tmp_path, monkeypatch):
    path = export_state_dicts(tmp_path / "course_state_dicts.pth", course["encoder"], course["rnn"],
                              encoded_image_size=1)
    monkeypatch.setattr(course_import, "load_pickled", lambda path: pytest.fail("the export was unpickled"))
    out = import_course_checkpoint(path, tiny_shapes.folder, tiny_shapes.data_name, out=tmp_path / "rnn.pth.tar")
    checkpoint = load_checkpoint(out)
    cfg = checkpoint["cfg"]
    assert (cfg["decoder"], cfg["encoded_image_size"], cfg["embed_dim"], cfg["decoder_dim"]) == ("rnn", 1, 24, 24)
    assert torch.equal(checkpoint["decoder_state"]["bn.running_mean"], course["rnn"].bn.running_mean)
    assert torch.equal(checkpoint["encoder_state"]["trunk.0.weight"], course["encoder"].resnet[0].weight.detach())
    assert_same_captions(checkpoint, course["rnn"], course["grid1_encodings"])


def test_decoder_without_attention_on_a_flattened_grid_is_refused(course, tiny_shapes, tmp_path):
    vocab_size = len(load_word_map(tiny_shapes.folder, tiny_shapes.data_name))
    flat = DecoderWithRNN(dict(DIMS, vocab_size=vocab_size, embed_dim=DIMS["decoder_dim"]), encoder_dim=2 * 2 * 2048)
    path = export_state_dicts(tmp_path / "flat.pth", course["encoder"], flat)
    with pytest.raises(ToolkitError, match=r"flattened 2 x 2 x 2048 grid \(init.weight \(24, 8192\)\)"):
        import_course_checkpoint(path, tiny_shapes.folder, tiny_shapes.data_name)


def test_tensors_that_do_not_fit_are_refused_by_name(course, tiny_shapes, tmp_path):
    state = course["attention"].state_dict()
    state["attention.decoder_att.weight"] = torch.zeros(12, 25)
    del state["fc.bias"]
    state["gate.weight"] = torch.zeros(3)
    path = tmp_path / "bad_decoder.pth"
    torch.save({"encoder": {}, "decoder": state}, path)
    with pytest.raises(ToolkitError) as error:
        import_course_checkpoint(path, tiny_shapes.folder, tiny_shapes.data_name)
    message = str(error.value)
    assert "'attention.decoder_att.weight' has shape (12, 25) where this toolkit's 'attention.decoder_att.weight' " \
           "has (12, 24)" in message
    assert "'fc.bias' (" in message and "is missing" in message
    assert "'gate.weight' (3,) has no counterpart" in message


def test_an_encoder_tensor_that_does_not_fit_is_refused_by_name(course, tiny_shapes, tmp_path):
    encoder_state = dict(course["encoder"].state_dict(), **{"resnet.7.2.bn3.weight": torch.ones(2047)})
    path = tmp_path / "bad_encoder.pth"
    torch.save({"encoder": encoder_state, "decoder": course["attention"].state_dict()}, path)
    with pytest.raises(ToolkitError, match=r"'resnet.7.2.bn3.weight' has shape \(2047,\) where this toolkit's "
                                           r"'trunk.7.2.bn3.weight' has \(2048,\)"):
        import_course_checkpoint(path, tiny_shapes.folder, tiny_shapes.data_name, encoded_image_size=2)


def test_other_course_names_map_onto_the_toolkits(course, tiny_shapes, tmp_path):
    """sgrvinod's `attention.full_att`, and a course decoder whose `beta` is the gate's Linear."""
    renames = {"attention.att.": "attention.full_att.", "f_beta.": "beta."}
    decoder_state = {next((new + name[len(old):] for old, new in renames.items() if name.startswith(old)), name): tensor
                     for name, tensor in course["attention"].state_dict().items()}
    assert "attention.full_att.weight" in decoder_state and "beta.weight" in decoder_state
    path = tmp_path / "renamed.pth"
    torch.save({"encoder": course["encoder"].state_dict(), "decoder": decoder_state}, path)
    out = import_course_checkpoint(path, tiny_shapes.folder, tiny_shapes.data_name, encoded_image_size=2)
    state = load_checkpoint(out)["decoder_state"]
    assert torch.equal(state["attention.att.bias"], decoder_state["attention.full_att.bias"])
    assert torch.equal(state["f_beta.weight"], decoder_state["beta.weight"])


class CallsGetcwd:
    def __reduce__(self):
        return os.getcwd, ()


def test_trusted_pickle_still_refuses_foreign_code(course, tiny_shapes, tmp_path):
    path = tmp_path / "foreign.pth.tar"
    torch.save({"encoder": nn.Linear(1, 1), "decoder": nn.Linear(1, 1), "epoch": CallsGetcwd()}, path)
    with pytest.raises(ToolkitError, match=r"refers to posix.getcwd, which a course checkpoint does not hold"):
        import_course_checkpoint(path, tiny_shapes.folder, tiny_shapes.data_name, trust_pickle=True)


def test_a_vocabulary_of_another_size_is_refused(course, tiny_shapes, tmp_path):
    state = dict(course["attention"].state_dict(), **{"embedding.weight": torch.zeros(3, DIMS["embed_dim"])})
    path = tmp_path / "other_vocabulary.pth"
    torch.save({"encoder": {}, "decoder": state}, path)
    with pytest.raises(ToolkitError, match="trained with a vocabulary of 3 words but WORDMAP_"):
        import_course_checkpoint(path, tiny_shapes.folder, tiny_shapes.data_name)


def test_an_imported_checkpoint_resumes_with_fresh_optimisers(pickled_attention, tiny_shapes, tmp_path, capsys):
    out = import_course_checkpoint(pickled_attention, tiny_shapes.folder, tiny_shapes.data_name, trust_pickle=True,
                                   out=str(tmp_path / "imported.pth.tar"))
    saved = load_checkpoint(out)
    cfg = {key: saved["cfg"][key] for key in config.MODEL_KEYS + ("dropout",)}
    cfg.update(data_folder=tiny_shapes.folder, data_name=tiny_shapes.data_name, checkpoint=out,
               epochs=saved["epoch"] + 2, output_folder=str(tmp_path / "out"), cache_folder=str(tmp_path),
               encoder_weights=None, workers=0, device="cpu", batch_size=40, print_freq=0,
               feature_cache=False)  # a random ResNet-101 overflows float16
    result = solver.train(cfg)
    assert "the optimisers start afresh" in capsys.readouterr().out
    assert load_checkpoint(result["last_checkpoint"])["epoch"] == saved["epoch"] + 1
