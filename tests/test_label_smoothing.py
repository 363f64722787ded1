"""cfg['label_smoothing']: the XE stage's cross-entropy smoothed over the vocabulary (PyTorch's own), checked
against the formula by hand; validation's loss stays the plain cross-entropy; values outside [0, 1) refused."""
import math

import pytest
import torch
import torch.nn.functional as F

import config
from models import DecoderWithAttention
from training_stages import Batch, TeacherForced, caption_loss, make_stage
from utils import ToolkitError

# Two captions of 3 and 2 real positions over a vocabulary of 4 (the second's last position is padding).
SCORES = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, -1.0, 0.0, 0.5]],
                       [[-0.5, 1.5, 1.0, 0.0], [1.0, 1.0, 1.0, 4.0], [9.0, 9.0, 9.0, 9.0]]])
TARGETS = torch.tensor([[1, 2, 3], [0, 3, 0]])
DECODE_LENGTHS = [3, 2]


def plain_loss(scores):
    return caption_loss(scores, TARGETS, DECODE_LENGTHS, None, 0.0, False)[0]


def test_no_smoothing_gives_exactly_the_plain_cross_entropy():
    smoothed = caption_loss(SCORES, TARGETS, DECODE_LENGTHS, None, 0.0, False, 0.0)[0]
    assert torch.equal(smoothed, plain_loss(SCORES))


def test_smoothing_gives_the_formulas_value():
    """(1 - eps) x NLL + eps x the mean over the classes of -log p, averaged over the real positions."""
    eps, terms = 0.1, []
    for caption, length in enumerate(DECODE_LENGTHS):
        for position in range(length):
            row = SCORES[caption, position].tolist()
            log_total = math.log(sum(math.exp(score) for score in row))
            minus_log_p = [log_total - score for score in row]
            nll = minus_log_p[TARGETS[caption, position]]
            terms.append((1 - eps) * nll + eps * sum(minus_log_p) / len(row))
    smoothed = caption_loss(SCORES, TARGETS, DECODE_LENGTHS, None, 0.0, False, eps)[0]
    assert smoothed.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert smoothed.item() != pytest.approx(plain_loss(SCORES).item())


def test_the_xe_stage_trains_on_the_smoothed_loss_and_validation_keeps_the_plain_one(capsys):
    torch.manual_seed(0)
    decoder = DecoderWithAttention(8, 12, 16, 20, 6).eval()  # eval: both passes see the same numbers
    generator = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(2, 2, 2, 6, generator=generator),
                  torch.randint(4, 20, (2, 3, 7), generator=generator), torch.tensor([[7, 5, 3], [6, 4, 2]]))
    cfg = {"training": "xe", "alpha_c": 0.0, "label_smoothing": 0.1}
    stage = make_stage(cfg, decoder, decoder, word_map=None)
    assert "is the smoothed cross-entropy" in capsys.readouterr().out
    loss, stats = stage.loss(batch)
    validation = TeacherForced(decoder, batch, 0.0, decoder.attention_regularization)  # as training.validate
    scores, targets = validation.packed_scores, validation.targets
    assert torch.equal(loss, F.cross_entropy(scores, targets, label_smoothing=0.1))
    assert torch.equal(stats["loss"][0], loss)
    assert torch.equal(validation.loss, F.cross_entropy(scores, targets))
    plain_stage = make_stage(dict(cfg, label_smoothing=0.0), decoder, decoder, word_map=None)
    assert capsys.readouterr().out == ""
    assert torch.equal(plain_stage.loss(batch)[0], validation.loss)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, float("nan")])
def test_label_smoothing_outside_zero_to_one_is_refused(value):
    with pytest.raises(ToolkitError, match=r"cfg\['label_smoothing'\] = .* must be in \[0, 1\)"):
        config.validate_cfg({"data_folder": "x", "data_name": "y", "label_smoothing": value})


def test_label_smoothing_is_refused_for_scst_and_taken_in_range():
    with pytest.raises(ToolkitError, match=r"cfg\['label_smoothing'\] = 0.1 smooths the cross-entropy of training"):
        config.validate_cfg({"data_folder": "x", "data_name": "y", "label_smoothing": 0.1, "training": "scst",
                             "checkpoint": "c.pth.tar"})
    assert config.validate_cfg({"data_folder": "x", "data_name": "y", "label_smoothing": 0.1})["label_smoothing"] == 0.1
    assert config.validate_cfg({"data_folder": "x", "data_name": "y"})["label_smoothing"] == 0.0
