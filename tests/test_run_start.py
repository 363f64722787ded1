"""run_start.resolve_start on its own: what a run resumes, its name, and what it refuses to overwrite or rewind,
from hand-made checkpoints (no model is built, nothing trains)."""
import os

import pytest

from checkpoints import empty_history, load_checkpoint, save_checkpoint
from config import validate_cfg
from run_start import resolve_start, resume_command
from utils import ToolkitError

WORD_MAP = {"<pad>": 0, "a": 1, "<unk>": 2, "<start>": 3, "<end>": 4}


def make_cfg(tmp_path, **overrides):
    cfg = {"data_folder": str(tmp_path / "data"), "data_name": "tiny", "output_folder": str(tmp_path / "out"),
           "encoder": "resnet18", "epochs": 5, "device": "cpu"}
    os.makedirs(cfg["output_folder"], exist_ok=True)
    return validate_cfg(dict(cfg, **overrides))


def write_checkpoint(path, cfg, epoch, scores=None, **extra):
    """A checkpoint as training writes it, with empty weights; `scores`: the val BLEU-4 of epochs 0..epoch."""
    history = empty_history()
    if scores is not None:
        history = {"epoch": list(range(len(scores))), "val_bleu4": list(scores)}
    save_checkpoint({"cfg": dict(cfg, checkpoint=None), "word_map": WORD_MAP, "encoder_state": {},
                     "decoder_state": {}, "decoder_optimizer": {}, "encoder_optimizer": None, "epoch": epoch,
                     "epochs_since_improvement": 0, "history": history, **extra}, str(path))
    return str(path)


def test_a_new_run_is_named_from_its_cfg_and_holds_the_lock(tmp_path):
    start = resolve_start(make_cfg(tmp_path), WORD_MAP)
    assert start.run_name == "tiny_attention_resnet18"
    assert (start.checkpoint, start.resumes) == (None, False)
    assert os.path.isfile(start.paths.lock) and start.lock.held
    start.lock.release()
    assert not os.path.exists(start.paths.lock)


def test_a_new_run_does_not_replace_a_run_of_the_same_name(tmp_path):
    cfg = make_cfg(tmp_path)
    write_checkpoint(tmp_path / "out" / "checkpoint_tiny_attention_resnet18.pth.tar", cfg, 1)
    with pytest.raises(ToolkitError, match="already holds a run named 'tiny_attention_resnet18'.*--overwrite"):
        resolve_start(cfg, WORD_MAP)
    assert not os.path.exists(tmp_path / "out" / ".tiny_attention_resnet18.lock")  # released on refusal
    resolve_start(dict(cfg, overwrite=True), WORD_MAP).lock.release()


def test_a_resume_keeps_the_checkpoints_run_name_and_fine_tuning(tmp_path):
    saved = make_cfg(tmp_path, run_name="mine", fine_tune_encoder=True)
    path = write_checkpoint(tmp_path / "out" / "checkpoint_mine.pth.tar", saved, 1, encoder_optimizer={})
    start = resolve_start(make_cfg(tmp_path, checkpoint=path), WORD_MAP)
    start.lock.release()
    assert (start.run_name, start.resumes, start.fine_tune_encoder) == ("mine", True, True)
    assert start.checkpoint["epoch"] == 1


def test_scst_starts_a_new_run_from_cross_entropy_weights(tmp_path):
    with pytest.raises(ToolkitError, match="SCST is the second stage"):
        resolve_start(make_cfg(tmp_path, training="scst"), WORD_MAP)
    path = write_checkpoint(tmp_path / "out" / "BEST_checkpoint_tiny_attention_resnet18.pth.tar", make_cfg(tmp_path), 4)
    start = resolve_start(make_cfg(tmp_path, training="scst", checkpoint=path), WORD_MAP)
    start.lock.release()
    assert (start.run_name, start.resumes) == ("tiny_attention_resnet18_scst", False)


def test_refusals_name_the_key_and_the_file(tmp_path):
    path = write_checkpoint(tmp_path / "out" / "c.pth.tar", make_cfg(tmp_path, decoder_dim=64), 1)
    with pytest.raises(ToolkitError, match=r"cfg\['decoder_dim'\] = 512 but checkpoint .*c.pth.tar.* with 64"):
        resolve_start(make_cfg(tmp_path, checkpoint=path), WORD_MAP)
    with pytest.raises(ToolkitError, match="word map of checkpoint .*c.pth.tar"):
        resolve_start(make_cfg(tmp_path, checkpoint=path, decoder_dim=64), dict(WORD_MAP, b=5))
    with pytest.raises(ToolkitError, match="trained epochs 0 to 1 and cfg\\['epochs'\\] = 2"):
        resolve_start(make_cfg(tmp_path, checkpoint=path, decoder_dim=64, epochs=2), WORD_MAP)


def test_resuming_an_older_checkpoint_would_rewind_the_run(tmp_path):
    cfg = make_cfg(tmp_path)
    best = write_checkpoint(tmp_path / "out" / "BEST_checkpoint_tiny_attention_resnet18.pth.tar", cfg, 1, [0.1, 0.2])
    write_checkpoint(tmp_path / "out" / "checkpoint_tiny_attention_resnet18.pth.tar", cfg, 3, [0.1, 0.2, 0.1, 0.1])
    with pytest.raises(ToolkitError, match="holds epoch 3, newer than epoch 1"):
        resolve_start(make_cfg(tmp_path, checkpoint=best), WORD_MAP)
    resolve_start(make_cfg(tmp_path, checkpoint=best, overwrite=True), WORD_MAP).lock.release()


def test_best_is_rewritten_when_it_lacks_the_best_epoch_of_the_resumed_history(tmp_path):
    cfg = make_cfg(tmp_path)
    best = tmp_path / "out" / "BEST_checkpoint_tiny_attention_resnet18.pth.tar"
    write_checkpoint(best, cfg, 0, [0.1])
    last = write_checkpoint(tmp_path / "out" / "checkpoint_tiny_attention_resnet18.pth.tar", cfg, 1, [0.1, 0.3])
    resolve_start(make_cfg(tmp_path, checkpoint=last), WORD_MAP).lock.release()
    assert load_checkpoint(str(best))["epoch"] == 1


def test_the_resume_command_repeats_the_options_that_differ_from_the_defaults(tmp_path):
    cfg = make_cfg(tmp_path, epochs=7, feature_cache=False)
    last = tmp_path / "out" / "checkpoint_x.pth.tar"
    assert "no checkpoint was written" in resume_command(cfg, str(last))
    write_checkpoint(last, cfg, 2)
    command = resume_command(cfg, str(last))
    assert "To resume after epoch 2" in command
    assert "--epochs 7" in command and "--no-feature-cache" in command and f"--checkpoint {last}" in command
    assert "--device" not in command and "--decoder-dim" not in command
