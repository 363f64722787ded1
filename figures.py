"""Figures: the course's per-word attention panels and the training curves of one or more runs.

Figures are `matplotlib.figure.Figure` objects, never pyplot ones: they need no GUI backend, no
global registry keeps them alive, and a notebook's backend is left alone. In a notebook run
`%matplotlib inline` once; a returned Figure then shows as a cell's last expression.

matplotlib and scikit-image take a second to import: they are imported inside the functions that use them.
"""
import math
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image

from run_log import METRICS_SUFFIX, aligned_columns, read_metrics_csv
from checkpoints import load_checkpoint
from utils import ToolkitError, atomic_path, to_numpy
from vocabulary import SPECIAL_WORDS

PIXELS_PER_CELL = 24  # the course's 14 x 24 = 336 pixel image for a 14 x 14 attention grid
PANELS_PER_ROW = 5
OVERLAY_OPACITY = 0.6


def upsample_attention(alpha_grid, scale=PIXELS_PER_CELL, smooth=True):
    """Upsample a (G, G) attention map to (G*scale, G*scale) pixels, cell (i, j) over pixels (i, j)*scale.

    smooth: as the course, skimage's `pyramid_expand(upscale=24, sigma=8)` (bilinear, then a gaussian
    blur of sigma = scale / 3); otherwise skimage's `resize` with order 0: every cell a flat block.
    """
    from skimage.transform import pyramid_expand, resize

    alpha_grid = np.asarray(alpha_grid, dtype=np.float64)
    if smooth:
        return pyramid_expand(alpha_grid, upscale=scale, sigma=scale / 3)  # (G*s, G*s)
    side = alpha_grid.shape[0] * scale
    return resize(alpha_grid, (side, side), order=0, anti_aliasing=False, preserve_range=True)  # (G*s, G*s)


def _attention_grids(alphas):
    """(T, P) with P = G*G, or (T, G, G) -> (T, G, G) array."""
    alphas = to_numpy(alphas)
    if alphas.ndim == 2:
        grid_size = math.isqrt(alphas.shape[1])
        if grid_size * grid_size == alphas.shape[1]:
            return alphas.reshape(len(alphas), grid_size, grid_size)
    elif alphas.ndim == 3 and alphas.shape[1] == alphas.shape[2]:
        return alphas
    raise ToolkitError(f"attention maps of shape {tuple(alphas.shape)} cannot be drawn: pass one map per "
                       f"generated word, shaped (words, G*G) or (words, G, G)")


def _save_png(fig, out):
    """Write `fig` to `out` as PNG, atomically."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")


def visualize_att(image_path, seq, alphas, rev_word_map, smooth=True, out=None, betas=None):
    """The course's per-word attention figure (caption.py); returns the Figure, writes a PNG if `out`.

    seq: word ids from `<start>` to `<end>` included, as beam search returns them.
    alphas: one map per generated word, i.e. per seq[1:], shaped (len(seq)-1, G*G) or (len(seq)-1, G, G);
        `<start>` is an input, never generated, so it has no map. Panel 0 is `<start>` over the plain image;
        panel t >= 1 is word seq[t] with map alphas[t-1] upsampled and overlaid (the course's beam search
        stored a dummy map for `<start>`: drop it, alphas[1:]). None (no-attention decoder): the image with
        the caption as its title.
    betas: optional, Adaptive Attention's sentinel weight per generated word (aligned with alphas),
        printed as `beta=0.xx` under each word's panel; 1 - beta is how much the word looks at the image.
    """
    words = [rev_word_map[int(word_id)] for word_id in seq]
    if alphas is None:
        if betas is not None:
            raise ToolkitError("betas were given without attention maps (alphas=None); pass both or neither")
        fig = _caption_figure(Image.open(image_path).convert("RGB"), words)
    else:
        grids = _attention_grids(alphas)  # (T, G, G)
        if len(grids) != len(words) - 1:
            raise ToolkitError(f"{len(grids)} attention maps for {len(words)} words ({' '.join(words)}): "
                               f"expected one per word after <start>, i.e. {len(words) - 1}")
        if betas is not None:
            betas = to_numpy(betas).reshape(-1)
            if len(betas) != len(grids):
                raise ToolkitError(f"{len(betas)} betas for {len(grids)} attention maps: pass one per map")
        fig = _attention_figure(image_path, words, grids, smooth, betas)
    if out is not None:
        _save_png(fig, out)
    return fig


def _caption_figure(image, words):
    """The no-attention decoder's figure: the image titled with its caption."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(image)
    ax.set_title(" ".join(word for word in words if word not in SPECIAL_WORDS), wrap=True)
    ax.axis("off")
    return fig


def _attention_figure(image_path, words, grids, smooth, betas):
    """A grid of panels: `<start>` over the plain image, then each word over its upsampled map."""
    from matplotlib.figure import Figure

    grid_size = grids.shape[1]
    side = grid_size * PIXELS_PER_CELL
    image = Image.open(image_path).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    n_rows = math.ceil(len(words) / PANELS_PER_ROW)
    fig = Figure(figsize=(3 * PANELS_PER_ROW, 3.3 * n_rows), layout="constrained")
    for t, word in enumerate(words):
        ax = fig.add_subplot(n_rows, PANELS_PER_ROW, t + 1)
        ax.imshow(image)
        ax.set_title(word)
        ax.set(xticks=[], yticks=[])  # no frame, but unlike axis("off") the x label below stays visible
        ax.spines[:].set_visible(False)
        if t == 0:
            continue  # <start> has no attention map
        upsampled = upsample_attention(grids[t - 1], PIXELS_PER_CELL, smooth)  # (side, side)
        # Scale from 0, not from the map's minimum: a uniform map stays flat instead of showing noise.
        ax.imshow(upsampled, cmap="Greys_r", alpha=OVERLAY_OPACITY, vmin=0, vmax=upsampled.max())
        if betas is not None:
            ax.set_xlabel(f"beta={betas[t - 1]:.2f}")
    return fig


# (title, history key drawn solid, history key drawn dashed as "<run> (train)" or None); a panel is
# drawn when some run has one of its keys. Every run has epoch and val_bleu4 (solver.train's history).
HISTORY_PANELS = (("validation loss", "val_loss", "train_loss"),
                  ("validation top-5 accuracy", "val_top5", None),
                  ("validation BLEU-4", "val_bleu4", None),
                  ("validation CIDEr", "val_cider", None),
                  ("SCST mean reward", "train_reward", None))
REQUIRED_KEYS = ("epoch", "val_bleu4")


def plot_history(runs, out=None):
    """The validation metrics per epoch, one line per run, one panel per metric some run has.

    runs: {label: source} or a list of sources (labels then come from each checkpoint's cfg or the CSV's
    run name); a source is a checkpoint path, a `<run>.metrics.csv` path (run_log.RunLog), a loaded
    checkpoint dict or a history dict {key: [value per epoch]}. Panels, when present: validation loss
    (with `train_loss` dashed), top-5 accuracy, BLEU-4, CIDEr (`val_cider`) and SCST's mean reward
    (`train_reward`). A key with fewer values than epochs covers the last epochs (it started later).
    Returns the Figure; writes a PNG when `out` is given.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labelled = runs.items() if isinstance(runs, Mapping) else [(None, source) for source in runs]
    histories = []  # (label, aligned history); two runs may share a label
    for index, (label, source) in enumerate(labelled):
        history, default_label = _history_and_label(source, index)
        label = label if label is not None else default_label
        _check_history(history, label)
        histories.append((label, aligned_columns(history)))
    panels = [panel for panel in HISTORY_PANELS
              if any(key in history for _, history in histories for key in panel[1:] if key)]
    fig = Figure(figsize=(5 * len(panels), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for index, (label, history) in enumerate(histories):
        for ax, (_, solid_key, dashed_key) in zip(axes, panels):
            if solid_key in history:
                ax.plot(*_series(history, solid_key), color=f"C{index}", marker="o", label=label)
            if dashed_key in history:
                ax.plot(*_series(history, dashed_key), color=f"C{index}", linestyle="--",
                        label=f"{label} (train)")
    for ax, (title, _, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if out is not None:
        _save_png(fig, out)
    return fig


def _history_and_label(source, index):
    """(history, default legend label) of a checkpoint or CSV path, a checkpoint dict or a history dict."""
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(METRICS_SUFFIX):
        return read_metrics_csv(source), os.path.basename(os.fspath(source))[:-len(METRICS_SUFFIX)]
    if isinstance(source, (str, os.PathLike)):
        source = load_checkpoint(source)
    if "history" in source:
        return source["history"], _run_label(source.get("cfg"), index)
    return source, _run_label(None, index)


def _run_label(cfg, index):
    """A legend label from a checkpoint's cfg: decoder, encoder and whether it was fine-tuned."""
    if not cfg:
        return f"run {index + 1}"
    label = f"{cfg.get('decoder', '?')} / {cfg.get('encoder', '?')}"
    return label + " fine-tuned" if cfg.get("fine_tune_encoder") else label


def _check_history(history, label):
    """Refuse a history that lacks a required key or has more values of a key than epochs, naming both."""
    for key in REQUIRED_KEYS:
        if key not in history:
            raise ToolkitError(f"the history of run {label!r} has no {key!r}; pass a checkpoint written by "
                               f"solver.train, its .metrics.csv, or a dict with at least the keys "
                               f"{', '.join(REQUIRED_KEYS)}")
    for key, values in history.items():
        if len(values) > len(history["epoch"]):
            raise ToolkitError(f"the history of run {label!r} has {len(values)} values of {key!r} for "
                               f"{len(history['epoch'])} epochs; a key has one value per epoch at most")


def _series(history, key):
    """(epochs counted from 1, values) of one key of an aligned history; missing values (None) become gaps."""
    epochs = np.asarray(history["epoch"]) + 1  # history counts from 0, people from 1
    return epochs, np.array([np.nan if value is None else value for value in history[key]], dtype=np.float64)
