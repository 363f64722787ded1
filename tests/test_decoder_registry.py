"""Adding a decoder is a class and one registry entry: a toy decoder defined here alone trains, beam-searches,
tests and captions through the toolkit, and the Transformer does all of it too (SCST included)."""
import os

import pytest
import torch
from torch import nn

import models
import solver
from checkpoints import load_checkpoint
from conftest import tiny_cfg


class MeanGRUDecoder(models.CaptionDecoder):
    """A toy decoder: a GRU cell started from the mean of the grid; no attention."""

    def __init__(self, embed_dim, decoder_dim, vocab_size, encoder_dim, dropout):
        super().__init__(embed_dim, decoder_dim, vocab_size, encoder_dim, dropout)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.cell = nn.GRUCell(embed_dim, decoder_dim)
        self.fc = nn.Linear(decoder_dim, vocab_size)

    @classmethod
    def from_cfg(cls, cfg, vocab_size, encoder_dim):
        return cls(cfg["embed_dim"], cfg["decoder_dim"], vocab_size, encoder_dim, cfg["dropout"])

    def start(self, encoder_out):
        return (), (torch.tanh(self.init_h(encoder_out.mean(dim=1))),)  # memory: nothing; state: h (B, D)

    def one_step(self, embeddings, memory, state):
        h = self.cell(embeddings, state[0])
        return self.fc(self.dropout(h)), (h,), None


def image_path(data):
    return os.path.join(data.folder, "shapes_images", "shapes_000000.jpg")


def test_a_decoder_defined_in_a_test_trains_tests_and_captions(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setitem(models.DECODERS, "mean_gru", MeanGRUDecoder)
    result = solver.train(tiny_cfg(tiny_shapes, tmp_path, decoder="mean_gru", epochs=2, decoder_lr=3e-2))
    assert result["best_checkpoint"].endswith("_mean_gru_resnet18.pth.tar")
    assert load_checkpoint(result["last_checkpoint"])["history"]["epoch"] == [0, 1]
    scores = solver.test(result["best_checkpoint"], beam_size=3, coco_metrics=False)
    assert 0 <= scores["bleu4"] <= 1
    captioned = solver.caption(result["best_checkpoint"], [image_path(tiny_shapes)], beam_size=2)[0]
    assert isinstance(captioned["caption"], str) and captioned["alphas"] is None


@pytest.fixture(scope="module")
def transformer_run(tiny_shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("transformer")
    cfg = tiny_cfg(tiny_shapes, folder, decoder="transformer", decoder_dim=32, transformer_layers=2,
                   transformer_encoder_layers=1, transformer_heads=4, transformer_ff_dim=64, epochs=2,
                   decoder_lr=1e-3, lr_warmup_steps=4)
    return cfg, solver.train(cfg)


def test_the_transformer_trains_with_a_warm_up_tests_and_captions(tiny_shapes, transformer_run):
    cfg, result = transformer_run
    saved = load_checkpoint(result["last_checkpoint"])
    assert saved["step"] == 2 * 3 and saved["cfg"]["lr_warmup_steps"] == 4  # 24 images / 8 per batch, 2 epochs
    assert saved["decoder_optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)  # warmed up
    scores = solver.test(result["best_checkpoint"], beam_size=3, coco_metrics=False)
    assert 0 <= scores["bleu4"] <= 1
    captioned = solver.caption(result["best_checkpoint"], [image_path(tiny_shapes)], beam_size=3)[0]
    assert captioned["alphas"].shape == (len(captioned["seq"]) - 1, 16)  # one 4 x 4 map per generated word
    torch.testing.assert_close(captioned["alphas"].sum(dim=1), torch.ones(len(captioned["seq"]) - 1))


def test_the_transformer_takes_the_scst_stage(tiny_shapes, transformer_run, tmp_path):
    cfg, result = transformer_run
    scst = solver.train(dict(cfg, training="scst", checkpoint=result["best_checkpoint"], epochs=1,
                             output_folder=str(tmp_path), lr_warmup_steps=0))
    history = load_checkpoint(scst["last_checkpoint"])["history"]
    assert len(history["train_reward"]) == len(history["val_cider"]) == 1


def test_the_default_warm_up_follows_the_decoder(tiny_shapes, tmp_path):
    import config

    assert config.validate_cfg(tiny_cfg(tiny_shapes, tmp_path, decoder="transformer"))["lr_warmup_steps"] == 20000
    assert config.validate_cfg(tiny_cfg(tiny_shapes, tmp_path, decoder="attention"))["lr_warmup_steps"] == 0
