"""The command line: train -> test -> caption -> compare on tiny shapes data, and bad input."""
import argparse
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def solver_cli(*args, check=True):
    result = subprocess.run([sys.executable, os.path.join(REPO, "solver.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_clean_error(result, *fragments):
    """Exit code 2, one `error:` message naming what is at fault, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr


def train_args(data, output, *extra):
    return ["train", "--data-folder", data.folder, "--data-name", data.data_name, "--encoder", "resnet18",
            "--encoder-weights", "none", "--encoded-image-size", "4", "--embed-dim", "32", "--attention-dim", "32",
            "--decoder-dim", "32", "--epochs", "1", "--batch-size", "40", "--workers", "0", "--print-freq", "0",
            "--output-folder", output, "--cache-folder", output, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def checkpoints(tiny_shapes, tmp_path_factory):
    """Best checkpoints of an attention and an rnn run trained through the command line."""
    output = tmp_path_factory.mktemp("cli")
    solver_cli(*train_args(tiny_shapes, output, "--attention"))
    solver_cli(*train_args(tiny_shapes, output, "--decoder", "rnn"))
    return {decoder: os.path.join(output, f"BEST_checkpoint_{tiny_shapes.data_name}_{decoder}_resnet18.pth.tar")
            for decoder in ("attention", "rnn")}


def test_train_writes_the_course_style_epoch_line(tiny_shapes, tmp_path):
    result = solver_cli(*train_args(tiny_shapes, tmp_path, "--decoder", "adaptive", "--no-group-captions"))
    assert " * LOSS - " in result.stdout and ", TOP-5 ACCURACY - " in result.stdout and ", BLEU-4 - " in result.stdout
    assert os.path.exists(tmp_path / f"checkpoint_{tiny_shapes.data_name}_adaptive_resnet18.pth.tar")


def test_test_prints_bleu_and_coco_metrics(checkpoints, tmp_path):
    predictions = tmp_path / "predictions.json"
    result = solver_cli("test", "--checkpoint", checkpoints["attention"], "--beam-size", "3",
                        "--predictions-json", predictions)
    lines = result.stdout.splitlines()
    for label in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "COCO-BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        line = next(line for line in lines if line.startswith(f"{label}: "))
        assert 0.0 <= float(line.split(": ")[1]) <= 1.0 or label == "CIDEr"
    assert any(line.startswith("SPICE: unavailable") for line in lines)
    assert len(json.loads(predictions.read_text())) == 8


def test_caption_prints_one_caption_per_image(checkpoints, tiny_shapes, tmp_path):
    images = [os.path.join(tiny_shapes.folder, "shapes_images", f"shapes_00000{i}.jpg") for i in range(2)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG nonsense")
    result = solver_cli("caption", "--checkpoint", checkpoints["rnn"], images[0], broken, images[1], check=False)
    captions = [line for line in result.stdout.splitlines() if line.startswith(tuple(images))]
    assert [line.split(": ")[0] for line in captions] == images
    assert all(len(line.split(": ")[1].split()) > 0 for line in captions)
    assert_clean_error(result, "broken.png")


def test_test_and_caption_decode_with_an_ensemble_of_several_checkpoints(checkpoints, tiny_shapes, tmp_path):
    """test's --checkpoint takes several paths, caption's is repeated (its images follow): both decode as
    Captioner.from_checkpoints."""
    import torch

    from captioner import Captioner
    from datasets import ImageCaptionsDataset

    both = [checkpoints["attention"], checkpoints["rnn"]]
    predictions, output = tmp_path / "predictions.json", tmp_path / "captions.jsonl"
    solver_cli("test", "--checkpoint", *both, "--beam-size", "2", "--no-coco-metrics", "--predictions-json",
               predictions, "--device", "cpu")
    images = [os.path.join(tiny_shapes.folder, "shapes_images", f"shapes_00000{i}.jpg") for i in range(2)]
    solver_cli("caption", "--checkpoint", both[0], "--checkpoint", both[1], *images, "--beam-size", "2", "--output",
               output, "--device", "cpu")
    ensemble = Captioner.from_checkpoints(both, device="cpu")
    test_images = torch.stack([item[0] for item in ImageCaptionsDataset(tiny_shapes.folder, tiny_shapes.data_name,
                                                                        "TEST")])  # (8, 3, S, S)
    found = ensemble.decode(ensemble.encode(test_images), beam_size=2)
    assert [entry["caption"] for entry in json.loads(predictions.read_text())] == [ensemble.text(f[0]) for f in found]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    expected = ensemble.caption(images, beam_size=2)
    assert [line["caption"] for line in lines] == [result["caption"] for result in expected]
    assert [line["score"] for line in lines] == pytest.approx([result["score"] for result in expected], abs=1e-4)


def test_compare_writes_a_markdown_table(checkpoints, tmp_path):
    out = tmp_path / "table.md"
    solver_cli("compare", checkpoints["attention"], checkpoints["rnn"], "--beam-size", "2", "--out", out)
    table = out.read_text().splitlines()
    assert table[0].startswith("| run |") and "BLEU-4" in table[0] and "CIDEr" in table[0] and "decoder" in table[0]
    assert len(table) == 4
    assert "| attention |" in table[2] and "| rnn |" in table[3]


def test_missing_checkpoint_is_a_clean_error(tmp_path):
    assert_clean_error(solver_cli("test", "--checkpoint", tmp_path / "nope.pth.tar", check=False), "nope.pth.tar")


def test_word_map_mismatch_is_a_clean_error(checkpoints, tiny_shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes.folder, data)
    word_map = data / f"WORDMAP_{tiny_shapes.data_name}.json"
    word_map.write_text(json.dumps({"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3}))
    result = solver_cli("test", "--checkpoint", checkpoints["rnn"], "--data-folder", data, check=False)
    assert_clean_error(result, "word map", "WORDMAP_")


def test_missing_data_is_a_clean_error(tmp_path):
    result = solver_cli("train", "--data-folder", tmp_path, "--data-name", "coco_5_cap_per_img_5_min_word_freq",
                        check=False)
    assert_clean_error(result, "WORDMAP_coco_5_cap_per_img_5_min_word_freq.json", "create_input_files.py")


def test_unknown_option_value_is_refused(tiny_shapes, tmp_path):
    result = solver_cli(*train_args(tiny_shapes, tmp_path, "--decoder", "gru"), check=False)
    assert_clean_error(result, "cfg['decoder'] = 'gru'")


# ---------------------------------------------------------------- the options match the functions


def subcommand_parsers():
    """subcommand name -> its argparse parser."""
    import solver

    commands = next(action for action in solver.build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    return commands.choices


def test_every_keyword_of_the_functions_has_its_option_and_help_lists_defaults():
    import solver
    from course_import import import_course_checkpoint
    from config import CFG_SCHEMA

    parsers = subcommand_parsers()
    functions = {"test": (solver.test, None), "caption": (solver.caption, None),
                 "compare": (solver.compare, solver.test), "import-course": (import_course_checkpoint, None)}
    for command, (function, extra) in functions.items():
        names = {parameter.name for parameter in inspect.signature(function).parameters.values()
                 if parameter.kind != parameter.VAR_KEYWORD}
        if extra is not None:
            names |= set(inspect.signature(extra).parameters) - set(solver.PASSED_ON_SKIP)
        destinations = {action.dest for action in parsers[command]._actions if action.dest != "help"}
        assert destinations == names, command
        text = parsers[command].format_help()
        for parameter in inspect.signature(function).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                option = "--" + parameter.name.replace("_", "-")
                after = " ".join(text.split(option, 1)[1].split())  # the option's help, whitespace normalised
                assert f"(default: {parameter.default})" in after, (command, option)
    for command in ("train", "cache-features"):
        destinations = {action.dest for action in parsers[command]._actions if action.dest != "help"}
        assert set(CFG_SCHEMA) <= destinations
        assert " ".join(parsers[command].format_help().split()).count("(default ") >= len(CFG_SCHEMA)


def test_the_options_reach_the_functions(monkeypatch):
    import solver

    calls = {}

    @functools.wraps(solver.test)  # the same signature, so the same options
    def record(**kwargs):
        calls["test"] = kwargs

    monkeypatch.setattr(solver, "test", record)
    solver.main(["test", "--checkpoint", "c.pth.tar", "--device", "cpu", "--batch-size", "7", "--max-steps", "9",
                 "--split", "VAL", "--no-coco-metrics", "--workers", "1", "--blind", "--length-penalty", "0.6",
                 "--block-trigrams", "--n-best", "2", "--tokenizer", "python",
                 "--clip-metric-model", "ViT-B-16:openai"])
    assert calls["test"] == {"checkpoint": ["c.pth.tar"], "beam_size": 3, "split": "VAL", "predictions_json": None,
                             "data_folder": None, "batch_size": 7, "max_steps": 9, "blind": True, "device": "cpu",
                             "coco_metrics": False, "workers": 1, "length_penalty": 0.6, "block_trigrams": True,
                             "n_best": 2, "tokenizer": "python",
                             "clip_metric_model": "ViT-B-16:openai", "instances": None}


@pytest.mark.parametrize("command", ["test", "caption"])
def test_bad_decoding_options_are_clean_errors(command, tmp_path):
    images = [] if command == "test" else [tmp_path / "photo.jpg"]
    result = solver_cli(command, "--checkpoint", tmp_path / "missing.pth.tar", *images, "--beam-size", "3",
                        "--n-best", "4", check=False)
    assert_clean_error(result, "n_best = 4 must be a whole number from 1 to beam_size (3) (--n-best)")
    result = solver_cli(command, "--checkpoint", tmp_path / "missing.pth.tar", *images, "--length-penalty", "-1",
                        check=False)
    assert_clean_error(result, "length_penalty = -1.0 must be a number of at least 0 (--length-penalty")


def test_caption_writes_json_lines_of_files_and_folders(checkpoints, tiny_shapes, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    images = [os.path.join(tiny_shapes.folder, "shapes_images", f"shapes_00000{i}.jpg") for i in range(3)]
    for image in images[1:]:
        shutil.copy(image, folder)
    output = tmp_path / "captions.jsonl"
    result = solver_cli("caption", "--checkpoint", checkpoints["attention"], images[0], folder, "--output", output,
                        "--figures", tmp_path / "figures", "--batch-size", "2", "--device", "cpu")
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["file"] for line in lines] == [images[0]] + [str(folder / os.path.basename(i)) for i in images[1:]]
    assert all(set(line) == {"file", "caption", "score"} and isinstance(line["caption"], str) and line["score"] <= 0
               for line in lines)
    assert [f"{line['file']}: {line['caption']}" for line in lines] == result.stdout.splitlines()[-3:]
    assert len(os.listdir(tmp_path / "figures")) == 3


def test_import_course_turns_a_course_export_into_a_checkpoint_that_captions(tiny_shapes, tmp_path):
    import torch

    from course_models import DecoderWithAttention, Encoder, randomize_batchnorm_statistics
    from datasets import load_word_map

    torch.manual_seed(0)
    vocab_size = len(load_word_map(tiny_shapes.folder, tiny_shapes.data_name))
    encoder = Encoder(encoded_image_size=2).eval()
    randomize_batchnorm_statistics(encoder, torch.Generator().manual_seed(0))
    decoder = DecoderWithAttention({"embed_dim": 16, "attention_dim": 12, "decoder_dim": 24, "dropout": 0.3,
                                    "device": torch.device("cpu"), "vocab_size": vocab_size})
    export = tmp_path / "course_export.pth"
    torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict(), "encoded_image_size": 2,
                "epoch": 3, "epochs_since_improvement": 0, "bleu-4": 0.2671}, export)
    out = tmp_path / "imported.pth.tar"
    result = solver_cli("import-course", export, "--data-folder", tiny_shapes.folder, "--data-name",
                        tiny_shapes.data_name, "--out", out)
    assert result.stdout.splitlines()[-1] == str(out)
    image = os.path.join(tiny_shapes.folder, "shapes_images", "shapes_000000.jpg")
    captioned = solver_cli("caption", "--checkpoint", out, image, "--beam-size", "2", "--max-steps", "5")
    assert captioned.stdout.splitlines()[-1].startswith(f"{image}: ")


def test_import_course_without_the_data_name_is_refused(tmp_path):
    result = solver_cli("import-course", tmp_path / "course.pth", "--data-folder", tmp_path, check=False)
    assert result.returncode == 2 and "--data-name" in result.stderr
