"""Figures and tables: attention panels, training curves, markdown results."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import utils
from figures import plot_history, upsample_attention, visualize_att
from run_log import RunLog
from metrics import results_table
from utils import markdown_table

WORD_MAP = {"<pad>": 0, "<unk>": 1, "<start>": 2, "<end>": 3, "a": 4, "red": 5, "circle": 6}
REV_WORD_MAP = {index: word for word, index in WORD_MAP.items()}
SEQ = [2, 4, 5, 6, 3]  # <start> a red circle <end>
GRID = 3


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "image.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


def attention_maps(shape):
    rng = np.random.default_rng(0)
    maps = rng.random((len(SEQ) - 1, GRID * GRID))
    return torch.tensor(maps / maps.sum(1, keepdims=True)).reshape(shape)


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file: fails on a truncated one


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("shape", [(len(SEQ) - 1, GRID * GRID), (len(SEQ) - 1, GRID, GRID)])
def test_visualize_att_one_panel_per_word_plus_image(tmp_path, image_path, smooth, shape):
    out = tmp_path / "figs" / "att.png"
    fig = visualize_att(image_path, SEQ, attention_maps(shape), REV_WORD_MAP, smooth=smooth, out=str(out))
    assert_png(out)
    assert len(fig.axes) == len(SEQ)  # <start> over the plain image, then one panel per generated word
    assert [ax.get_title() for ax in fig.axes] == ["<start>", "a", "red", "circle", "<end>"]
    assert len(fig.axes[0].images) == 1  # plain image
    side = GRID * 24
    for ax in fig.axes[1:]:
        image, overlay = ax.images
        assert image.get_array().shape[:2] == (side, side)
        assert overlay.get_array().shape == (side, side)
        assert overlay.get_clim()[0] == 0  # darkest = no attention, not the map's own minimum
    assert not any(ax.get_xlabel() for ax in fig.axes)  # no betas given
    assert not [name for name in os.listdir(out.parent) if name != "att.png"]  # no temp file left


def test_visualize_att_panel_t_shows_map_t_minus_1(image_path):
    """The off-by-one is pinned: the word seq[t] is drawn over alphas[t-1]."""
    alphas = np.zeros((len(SEQ) - 1, GRID, GRID))
    for t in range(len(alphas)):
        alphas[t].flat[t] = 1.0  # map t looks at cell t only
    fig = visualize_att(image_path, SEQ, alphas, REV_WORD_MAP, smooth=False)
    for t, ax in enumerate(fig.axes[1:]):
        overlay = ax.images[1].get_array()
        np.testing.assert_array_equal(overlay, upsample_attention(alphas[t], smooth=False))


def test_visualize_att_shows_betas(image_path):
    betas = torch.tensor([0.1, 0.25, 0.5, 0.987])
    fig = visualize_att(image_path, SEQ, attention_maps((4, 9)), REV_WORD_MAP, betas=betas)
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "beta=0.10", "beta=0.25", "beta=0.50", "beta=0.99"]


def test_visualize_att_without_attention_shows_the_caption(tmp_path, image_path):
    out = tmp_path / "caption.png"
    fig = visualize_att(image_path, SEQ, None, REV_WORD_MAP, out=str(out))
    assert_png(out)
    assert len(fig.axes) == 1
    assert fig.axes[0].get_title() == "a red circle"


def test_visualize_att_refuses_maps_that_do_not_match_the_words(image_path):
    with pytest.raises(utils.ToolkitError, match="4 attention maps for 4 words"):
        visualize_att(image_path, SEQ[:-1], attention_maps((4, 9)), REV_WORD_MAP)
    with pytest.raises(utils.ToolkitError, match=r"shape \(4, 8\)"):
        visualize_att(image_path, SEQ, np.ones((4, 8)), REV_WORD_MAP)


@pytest.mark.parametrize("smooth", [True, False])
def test_upsampled_map_is_aligned_with_the_image(smooth):
    alpha = np.zeros((GRID, GRID))
    alpha[0, 0] = 1.0  # top-left cell
    upsampled = upsample_attention(alpha, scale=24, smooth=smooth)
    assert upsampled.shape == (72, 72)
    row, col = np.unravel_index(np.argmax(upsampled), upsampled.shape)
    assert row < 24 and col < 24  # brightest pixel inside the top-left cell
    assert upsampled[:24, :24].mean() > 3 * upsampled[24:, :].mean()
    if not smooth:
        assert (upsampled[:24, :24] == 1).all() and upsampled.sum() == 24 * 24
    alpha = np.zeros((GRID, GRID))
    alpha[2, 1] = 1.0  # bottom-middle cell
    row, col = np.unravel_index(np.argmax(upsample_attention(alpha, 24, smooth)), (72, 72))
    assert row >= 48 and 24 <= col < 48


def history(n_epochs, offset):
    epochs = list(range(n_epochs))
    return {"epoch": epochs, "train_loss": [3.0 - 0.1 * e for e in epochs],
            "train_top5": [70.0 + e for e in epochs], "val_loss": [3.2 - 0.1 * e + offset for e in epochs],
            "val_top5": [72.0 + e + offset for e in epochs], "val_bleu4": [0.2 + 0.01 * e + offset for e in epochs],
            "lr": [4e-4] * n_epochs, "seconds": [1.0] * n_epochs}


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_history_draws_every_run_from_histories(tmp_path):
    out = tmp_path / "curves.png"
    fig = plot_history({"no attention": history(3, 0.0), "attention": history(4, 0.05)}, out=str(out))
    assert_png(out)
    loss_ax, top5_ax, bleu_ax = fig.axes
    for ax in (top5_ax, bleu_ax):
        assert sorted(lines_by_label(ax)) == ["attention", "no attention"]
    assert sorted(lines_by_label(loss_ax)) == ["attention", "attention (train)", "no attention", "no attention (train)"]
    assert lines_by_label(loss_ax)["attention (train)"].get_linestyle() == "--"
    np.testing.assert_array_equal(lines_by_label(bleu_ax)["attention"].get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(lines_by_label(bleu_ax)["attention"].get_ydata(), [0.25, 0.26, 0.27, 0.28])


def test_plot_history_labels_checkpoints_from_their_cfg(tmp_path):
    paths = []
    for decoder, fine_tune in [("rnn", False), ("attention", False), ("attention", True)]:
        path = tmp_path / f"{decoder}_{fine_tune}.pth.tar"
        cfg = {"decoder": decoder, "encoder": "resnet101", "fine_tune_encoder": fine_tune}
        checkpoints.save_checkpoint({"cfg": cfg, "history": history(2, 0.0)}, str(path))
        paths.append(str(path))
    fig = plot_history(paths)
    expected = ["attention / resnet101", "attention / resnet101 fine-tuned", "rnn / resnet101"]
    for ax in fig.axes[1:]:
        assert sorted(lines_by_label(ax)) == expected
    assert len(fig.axes[0].get_lines()) == 2 * len(paths)


def test_plot_history_names_the_missing_key():
    broken = history(2, 0.0)
    del broken["val_bleu4"]
    with pytest.raises(utils.ToolkitError, match="'demo'.*'val_bleu4'"):
        plot_history({"demo": broken})


def test_plot_history_reads_a_metrics_csv_and_shows_the_metrics_present(tmp_path):
    scst = dict(history(4, 0.0), val_cider=[0.5, 0.6, 0.7, 0.8], train_reward=[0.9, 1.1])  # SCST from epoch 3
    with RunLog(str(tmp_path), "shapes_attention") as log:
        log.epoch(scst)
    fig = plot_history([str(tmp_path / "shapes_attention.metrics.csv"), history(3, 0.0)])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["validation loss", "validation top-5 accuracy", "validation BLEU-4", "validation CIDEr",
                      "SCST mean reward"]
    cider, reward = (lines_by_label(ax) for ax in fig.axes[3:])
    assert sorted(cider) == sorted(reward) == ["shapes_attention"]  # run 2 has neither
    np.testing.assert_allclose(cider["shapes_attention"].get_ydata(), [0.5, 0.6, 0.7, 0.8])
    np.testing.assert_array_equal(reward["shapes_attention"].get_xdata()[-2:], [3, 4])
    np.testing.assert_allclose(reward["shapes_attention"].get_ydata(), [np.nan, np.nan, 0.9, 1.1])
    assert sorted(lines_by_label(fig.axes[2])) == ["run 2", "shapes_attention"]


def test_plot_history_draws_runs_that_share_a_label():
    fig = plot_history([history(2, 0.0), {"cfg": None, "history": history(3, 0.1)}, history(2, 0.2)])
    assert [line.get_label() for line in fig.axes[2].get_lines()] == ["run 1", "run 2", "run 3"]
    same = plot_history([{"cfg": {"decoder": "rnn", "encoder": "resnet18"}, "history": history(2, offset)}
                         for offset in (0.0, 0.1)])
    assert len(same.axes[2].get_lines()) == 2


def test_plot_history_without_loss_and_top5_shows_bleu_alone():
    fig = plot_history({"scst": {"epoch": [0, 1], "val_bleu4": [0.3, 0.31]}})
    assert [ax.get_title() for ax in fig.axes] == ["validation BLEU-4"]


def test_plot_history_refuses_more_values_than_epochs():
    broken = dict(history(2, 0.0), val_cider=[0.1, 0.2, 0.3])
    with pytest.raises(utils.ToolkitError, match="'demo'.*3 values of 'val_cider' for 2 epochs"):
        plot_history({"demo": broken})


def test_markdown_table():
    rows = [{"name": "a|b", "score": 0.123456, "n": 5}, {"name": "c", "score": None}]
    assert markdown_table(rows, [("name", "Name"), ("score", "Score"), ("n", "N")]) == (
        "| Name | Score | N |\n"
        "| --- | --- | --- |\n"
        "| a\\|b | 0.1235 | 5 |\n"
        "| c | — | — |")


def test_results_table_orders_the_present_metrics():
    results = {"no_attention": {"bleu4": 0.25, "bleu1": 0.7, "cider": 0.81234},
               "attention": {"bleu1": np.float32(0.75), "bleu4": 0.3, "my_metric": 2}}
    assert results_table(results) == (
        "| run | BLEU-1 | BLEU-4 | CIDEr | my_metric |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| no_attention | 0.7000 | 0.2500 | 0.8123 | — |\n"
        "| attention | 0.7500 | 0.3000 | — | 2 |")
