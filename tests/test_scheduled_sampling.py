"""Scheduled sampling (Bengio et al., 2015) in the XE stage, with self-critical.pytorch's keys and formula: p = 0
is today's teacher forcing exactly; the step-by-step pass gives what the decoders' forward gives; p = 1 feeds only
the model's own draws, p in between mixes them with the reference's words; p follows the formula per epoch, is
in the history and the checkpoint, and comes back on resume; bad values are refused."""
import pytest
import torch
import torch.nn.functional as F

import config
import solver
import training_stages
from checkpoints import load_checkpoint, run_name, save_checkpoint
from conftest import tiny_cfg
from run_log import metrics_csv_path, read_metrics_csv
from test_teacher_forcing import grouped_batch, make_decoder
from training import Trainer
from training_stages import Batch, TeacherForced, make_stage, scheduled_sampling_pass, scheduled_sampling_probability
from utils import ToolkitError

DECODERS = ["rnn", "attention", "adaptive", "transformer"]


def xe_stage(decoder, probability):
    stage = make_stage({"training": "xe", "alpha_c": 1.0, "label_smoothing": 0.0}, decoder, decoder, word_map=None)
    stage.sampling_probability = probability
    return stage


def stage_batch():
    """A grouped batch as the loader gives it: encodings (3, 9, C), 5 captions of each image."""
    encoder_out, captions, lengths, _ = grouped_batch()
    return Batch(encoder_out.flatten(1, 2), captions.reshape(3, 5, -1), lengths.reshape(3, 5))


class Recorder:
    """The words each call of the decoder's embedding layer took, and the draws of mixed_inputs."""

    def __init__(self, decoder, monkeypatch):
        self.inputs, self.draws, self.distributions = [], [], []
        decoder.embedding.register_forward_hook(lambda module, args, output: self.inputs.append(args[0].clone()))
        draw_words = training_stages.draw_words

        def recorded_draw(log_probs, generator=None):
            self.distributions.append(log_probs)
            self.draws.append(draw_words(log_probs, generator))
            return self.draws[-1]
        monkeypatch.setattr(training_stages, "draw_words", recorded_draw)


def sampled_pass(decoder, probability, seed=3):
    encoder_out, captions, lengths, caption_image = grouped_batch()
    generator = torch.Generator().manual_seed(seed)
    return scheduled_sampling_pass(decoder, encoder_out, captions, lengths, caption_image, probability, generator)


@pytest.mark.parametrize("name", DECODERS)
def test_the_stage_at_p_0_is_todays_teacher_forcing_exactly(name):
    decoder = make_decoder(name).eval()
    batch = stage_batch()
    stage = xe_stage(decoder, 0.0)
    assert not stage.decodes_unwrapped
    loss = stage.loss(batch)[0]
    assert torch.equal(loss, TeacherForced(decoder, batch, 1.0, decoder.attention_regularization).loss)


@pytest.mark.parametrize("name", DECODERS)
def test_the_step_by_step_pass_without_draws_gives_the_forward_outputs(name):
    decoder = make_decoder(name).eval()
    inputs = grouped_batch()
    with torch.no_grad():
        scores, captions, decode_lengths, alphas, order = decoder(*inputs)
        got_scores, got_captions, got_lengths, got_alphas, got_order = sampled_pass(decoder, 0.0)
    assert got_lengths == decode_lengths and torch.equal(got_captions, captions) and torch.equal(got_order, order)
    torch.testing.assert_close(got_scores, scores, rtol=1e-5, atol=1e-5)
    assert (got_alphas is None) == (alphas is None)
    if alphas is not None:
        torch.testing.assert_close(got_alphas, alphas, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_at_p_1_every_input_after_start_is_the_draw_from_the_previous_step(name, monkeypatch):
    decoder = make_decoder(name).eval()
    recorder = Recorder(decoder, monkeypatch)
    scores, captions, decode_lengths, _, _ = sampled_pass(decoder, 1.0)
    assert torch.equal(recorder.inputs[0], captions[:, 0])  # <start>
    assert len(recorder.inputs) == max(decode_lengths) and len(recorder.draws) == max(decode_lengths) - 1
    for t, (words, draws, log_probs) in enumerate(zip(recorder.inputs[1:], recorder.draws,
                                                      recorder.distributions), start=1):
        rows = len(words)
        assert rows == sum(length > t for length in decode_lengths)
        assert torch.equal(words, draws)
        assert not log_probs.requires_grad  # detached: no gradient through the choice
        torch.testing.assert_close(log_probs, F.log_softmax(scores[:rows, t - 1], dim=1))
    assert any(not torch.equal(words, captions[:len(words), t]) for t, words in enumerate(recorder.inputs))


def test_between_0_and_1_some_inputs_are_drawn_and_the_others_are_the_references(monkeypatch):
    decoder = make_decoder("attention").eval()
    recorder = Recorder(decoder, monkeypatch)
    scores, captions, _, _, _ = sampled_pass(decoder, 0.5)
    drawn = reference = 0
    for t, (words, draws) in enumerate(zip(recorder.inputs[1:], recorder.draws), start=1):
        from_draws, from_references = words == draws, words == captions[:len(words), t]
        assert (from_draws | from_references).all()
        drawn += (from_draws & ~from_references).sum().item()
        reference += (from_references & ~from_draws).sum().item()
    assert drawn > 10 and reference > 10  # of 75 positions, with this seed
    again = sampled_pass(decoder, 0.5)[0]
    assert torch.equal(again, scores)  # the same generator seed: the same draws


def test_the_stage_with_p_above_0_steps_through_the_decoder_itself():
    """Under DDP the stage's `decoder` is the wrapper: scheduled sampling goes round it, and the trainer
    all-reduces the gradients by hand (decodes_unwrapped), as for SCST."""
    decoder = make_decoder("adaptive").train()

    def wrapper(*args):
        raise AssertionError("the decoder's forward (DDP's wrapper) must not be called")
    stage = make_stage({"training": "xe", "alpha_c": 1.0, "label_smoothing": 0.0}, wrapper, decoder, word_map=None)
    stage.sampling_probability = 0.25
    assert stage.decodes_unwrapped
    loss, stats = stage.loss(stage_batch())
    loss.backward()
    assert decoder.fc.weight.grad is not None and stats["loss"][1] > 0


def test_p_follows_self_critical_pytorchs_formula():
    cfg = {"scheduled_sampling_start": 0, "scheduled_sampling_increase_every": 5,
           "scheduled_sampling_increase_prob": 0.05, "scheduled_sampling_max_prob": 0.25}
    probabilities = [scheduled_sampling_probability(cfg, epoch) for epoch in range(32)]
    assert probabilities == [min(0.05 * (epoch // 5), 0.25) for epoch in range(32)]
    assert probabilities[:5] == [0.0] * 5 and probabilities[5] == 0.05 and probabilities[29:] == [0.25] * 3
    late = dict(cfg, scheduled_sampling_start=3, scheduled_sampling_increase_every=2,
                scheduled_sampling_increase_prob=0.1)
    assert [scheduled_sampling_probability(late, epoch) for epoch in range(-1, 11)] == pytest.approx(
        [0.0] * 6 + [0.1, 0.1, 0.2, 0.2, 0.25, 0.25])  # epochs -1 to 2, 3 and 4 (frac 0), 5 to 10
    off = dict(cfg, scheduled_sampling_start=-1)
    assert {scheduled_sampling_probability(off, epoch) for epoch in range(-1, 40)} == {0.0}


SCHEDULE = {"scheduled_sampling_start": 0, "scheduled_sampling_increase_every": 1,
            "scheduled_sampling_increase_prob": 0.5, "scheduled_sampling_max_prob": 0.75}


def test_p_is_in_the_history_and_the_checkpoint_and_a_resumed_run_ends_as_an_uninterrupted_one(tiny_shapes,
                                                                                                tmp_path):
    straight = solver.train(tiny_cfg(tiny_shapes, tmp_path / "straight", decoder="attention", epochs=3, **SCHEDULE))
    cfg = tiny_cfg(tiny_shapes, tmp_path, decoder="attention", **SCHEDULE)
    first = solver.train(cfg)
    saved = load_checkpoint(first["last_checkpoint"])
    assert saved["scheduled_sampling_prob"] == 0.0 and saved["history"]["scheduled_sampling_prob"] == [0.0]
    resumed = Trainer(config.validate_cfg(dict(cfg, epochs=3, checkpoint=first["last_checkpoint"])))
    assert resumed.state["scheduled_sampling_prob"] == 0.0
    history = resumed.run()["history"]  # epoch 1 at p = 0.5, epoch 2 at 0.75: the sampled path trains
    assert history["scheduled_sampling_prob"] == [0.0, 0.5, 0.75]
    assert load_checkpoint(first["last_checkpoint"])["scheduled_sampling_prob"] == 0.75
    csv = read_metrics_csv(metrics_csv_path(str(tmp_path), run_name(config.validate_cfg(cfg))))
    assert csv["scheduled_sampling_prob"] == [0.0, 0.5, 0.75]
    a, b = load_checkpoint(straight["last_checkpoint"]), load_checkpoint(first["last_checkpoint"])
    assert all(torch.equal(a["decoder_state"][name], b["decoder_state"][name]) for name in a["decoder_state"])


def resumed_state(cfg, checkpoint, path):
    """The state of a Trainer resuming `checkpoint` (written to `path`), before its first epoch."""
    save_checkpoint(checkpoint, path)
    trainer = Trainer(config.validate_cfg(dict(cfg, checkpoint=path)))
    trainer.lock.release()
    return trainer.state


def test_resume_restores_the_saved_p_and_takes_the_formulas_for_a_checkpoint_without_it(tiny_shapes, tmp_path):
    first = solver.train(tiny_cfg(tiny_shapes, tmp_path, decoder="rnn", epochs=2))
    assert "scheduled_sampling_prob" not in first["history"]  # a run without scheduled sampling records none
    checkpoint, path = load_checkpoint(first["last_checkpoint"]), first["last_checkpoint"]
    cfg = tiny_cfg(tiny_shapes, tmp_path, decoder="rnn", epochs=3, **SCHEDULE)
    assert resumed_state(cfg, dict(checkpoint, scheduled_sampling_prob=0.125), path)["scheduled_sampling_prob"] == 0.125
    del checkpoint["scheduled_sampling_prob"]  # as an earlier version of the toolkit wrote it
    state = resumed_state(cfg, checkpoint, path)
    assert state["epoch"] == 1 and state["scheduled_sampling_prob"] == 0.5  # the formula at epoch 1


@pytest.mark.parametrize("key, value, message", [
    ("scheduled_sampling_start", -2, "must be -1 \\(no scheduled sampling\\) or the epoch"),
    ("scheduled_sampling_increase_every", 0, "must be at least 1"),
    ("scheduled_sampling_increase_prob", -0.05, "must be a probability in \\[0, 1\\]"),
    ("scheduled_sampling_increase_prob", float("nan"), "must be a probability in \\[0, 1\\]"),
    ("scheduled_sampling_max_prob", 1.5, "must be a probability in \\[0, 1\\]"),
    ("scheduled_sampling_max_prob", 0.5j, "has type complex; expected float or int"),
    ("scheduled_sampling_start", 1.0, "has type float; expected int"),
])
def test_bad_values_are_refused(key, value, message):
    with pytest.raises(ToolkitError, match=f"cfg\\['{key}'\\] = .*{message}"):
        config.validate_cfg({"data_folder": "x", "data_name": "y", key: value})


def test_scheduled_sampling_is_refused_for_scst_and_taken_for_xe():
    with pytest.raises(ToolkitError, match="cfg\\['scheduled_sampling_start'\\] = 0 turns on scheduled sampling in "
                                           "the XE stage; SCST"):
        config.validate_cfg({"data_folder": "x", "data_name": "y", "training": "scst", "checkpoint": "c.pth.tar",
                             "scheduled_sampling_start": 0})
    cfg = config.validate_cfg({"data_folder": "x", "data_name": "y", "scheduled_sampling_start": 0,
                               "scheduled_sampling_max_prob": 1})
    assert cfg["scheduled_sampling_start"] == 0 and cfg["scheduled_sampling_increase_every"] == 5
    assert config.validate_cfg({"data_folder": "x", "data_name": "y"})["scheduled_sampling_start"] == -1
