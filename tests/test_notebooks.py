"""The three notebooks execute top to bottom (nbclient, the venv's python3 kernel) on tiny shapes data,
pointed there by the CAPTIONING_CFG environment variable, and are committed without outputs."""
import base64
import io
import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

import solver
from conftest import tiny_cfg
from datasets import load_word_map
from checkpoints import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("train.ipynb", "test.ipynb", "caption.ipynb")


def execute(name, overrides, monkeypatch):
    """Run a notebook of the repository in a fresh kernel whose cwd is the repository; return it with outputs."""
    monkeypatch.setenv("CAPTIONING_CFG", json.dumps(overrides))  # the kernel inherits the environment
    notebook = nbformat.read(os.path.join(REPO, name), as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    return notebook


def outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed(notebook):
    return "".join(output.text for output in outputs(notebook) if output.output_type == "stream" and output.name == "stdout")


def displayed_images(notebook):
    """The PNG images the notebook displayed, as PIL images."""
    return [Image.open(io.BytesIO(base64.b64decode(output.data["image/png"]))) for output in outputs(notebook)
            if "image/png" in output.get("data", {})]


def first_test_image(data):
    with open(os.path.join(data.folder, "dataset_shapes.json"), encoding="utf-8") as file:
        image = next(image for image in json.load(file)["images"] if image["split"] == "test")
    return os.path.join(data.folder, image["filepath"], image["filename"])


@pytest.fixture(scope="module")
def trained_in_notebook(tiny_shapes, tmp_path_factory):
    """train.ipynb run on tiny data with the attention decoder: (the executed notebook, its output folder)."""
    folder = tmp_path_factory.mktemp("notebook_train")
    with pytest.MonkeyPatch.context() as monkeypatch:
        notebook = execute("train.ipynb", tiny_cfg(tiny_shapes, folder, attention=True), monkeypatch)
    return notebook, folder


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(os.path.join(REPO, name), as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "solver.with_env_overrides(cfg)" in "".join(cell.source for cell in code)


def test_train_notebook_trains_and_shows_the_epochs(trained_in_notebook, tiny_shapes):
    notebook, folder = trained_in_notebook
    checkpoint_path, scst_path = sorted(p for p in os.listdir(folder) if p.startswith("checkpoint_"))
    assert scst_path == checkpoint_path.replace(".pth.tar", "_scst.pth.tar")  # the second stage's cell
    assert load_checkpoint(os.path.join(folder, scst_path))["cfg"]["training"] == "scst"
    checkpoint = load_checkpoint(os.path.join(folder, checkpoint_path))
    assert checkpoint["cfg"]["decoder"] == "attention" and checkpoint["cfg"]["data_folder"] == tiny_shapes.folder
    assert checkpoint["history"]["epoch"] == [0]
    assert "* LOSS - " in printed(notebook)
    history_table = [output.data["text/markdown"] for output in outputs(notebook) if "text/markdown" in output.get("data", {})]
    assert len(history_table) == 1 and "val BLEU-4" in history_table[0]
    assert len(displayed_images(notebook)) == 2  # the training curves, then those of both stages


def test_test_notebook_prints_bleu(trained_in_notebook, monkeypatch):
    _, folder = trained_in_notebook
    [best] = [p for p in os.listdir(folder) if p.startswith("BEST_") and not p.endswith("_scst.pth.tar")]
    notebook = execute("test.ipynb", {"checkpoint": str(folder / best), "coco_metrics": False, "beam_size": 2},
                       monkeypatch)
    text = printed(notebook)
    scores = dict(re.findall(r"^(BLEU-[1-4]): (\d\.\d{4})$", text, flags=re.MULTILINE))
    assert sorted(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    assert all(0 <= float(score) <= 1 for score in scores.values())
    assert "beam size 2" in text and "METEOR" not in text
    [table] = [output.data["text/markdown"] for output in outputs(notebook) if "text/markdown" in output.get("data", {})]
    assert best in table and "BLEU-4" in table


@pytest.mark.parametrize("decoder", ["attention", "rnn"])
def test_caption_notebook_draws_the_figure(decoder, trained_in_notebook, tiny_shapes, tmp_path, monkeypatch):
    if decoder == "attention":
        folder = trained_in_notebook[1]
        [checkpoint] = [str(folder / p) for p in os.listdir(folder)
                        if p.startswith("BEST_") and not p.endswith("_scst.pth.tar")]
    else:
        checkpoint = solver.train(tiny_cfg(tiny_shapes, tmp_path))["best_checkpoint"]
    notebook = execute("caption.ipynb", {"checkpoint": checkpoint, "image_path": first_test_image(tiny_shapes),
                                         "out": str(tmp_path / "figure.png")}, monkeypatch)
    assert set(printed(notebook).split()) <= set(load_word_map(tiny_shapes.folder, tiny_shapes.data_name)) - {
        "<start>", "<end>", "<pad>"}  # the caption
    [shown] = displayed_images(notebook)
    for width, height in (shown.size, Image.open(tmp_path / "figure.png").size):
        # Attention: panels of <start> and each word, five per row; no attention: the image under its caption.
        assert width > height if decoder == "attention" else width < height
