"""The SCST stage: it starts from a cross-entropy checkpoint without touching it, raises its reward, resumes
exactly, and validates by decoding."""
import os

import numpy as np
import pytest
import torch

import solver
from checkpoints import load_checkpoint
from conftest import tiny_cfg
from utils import ToolkitError


def scst_cfg(data, folder, **overrides):
    return tiny_cfg(data, folder, **{"decoder": "attention", "scst_lr": 1e-3, "epochs": 2,
                                     "training": "scst", "deterministic": True, **overrides})


@pytest.fixture(scope="module")
def xe_run(tiny_shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("xe")
    return solver.train(tiny_cfg(tiny_shapes, folder, decoder="attention", epochs=1, decoder_lr=3e-2, batch_size=10))


def test_scst_starts_a_new_run_raises_its_reward_and_leaves_the_xe_checkpoints_alone(tiny_shapes, xe_run):
    folder = os.path.dirname(xe_run["best_checkpoint"])
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)
              if name.endswith(".pth.tar")}
    # 6 epochs: the reward of 24 images' samples is noisy from one epoch to the next
    result = solver.train(scst_cfg(tiny_shapes, folder, epochs=6, checkpoint=xe_run["best_checkpoint"],
                                   early_stop_patience=6))
    assert result["best_checkpoint"].endswith("_attention_resnet18_scst.pth.tar")
    for name, content in before.items():
        assert open(os.path.join(folder, name), "rb").read() == content, name
    history = result["history"]
    assert history["epoch"] == list(range(6))
    assert sum(history["train_reward"][-2:]) / 2 > history["train_reward"][0]
    assert len(history["train_baseline"]) == len(history["val_cider"]) == 6
    assert result["val_metric"] == "cider"
    saved = load_checkpoint(result["last_checkpoint"])
    assert saved["cfg"]["training"] == "scst" and saved["best_score"] == max(history["val_cider"])


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_an_scst_resume_equals_an_uninterrupted_scst_run(tiny_shapes, xe_run, tmp_path, baseline):
    options = {"checkpoint": xe_run["best_checkpoint"], "scst_baseline": baseline}
    straight = solver.train(scst_cfg(tiny_shapes, tmp_path / "straight", run_name="a", **options))
    first = solver.train(scst_cfg(tiny_shapes, tmp_path / "resumed", run_name="b", epochs=1, **options))
    resumed = solver.train(scst_cfg(tiny_shapes, tmp_path / "resumed", run_name="b",
                                    **dict(options, checkpoint=first["last_checkpoint"])))
    a, b = load_checkpoint(straight["last_checkpoint"]), load_checkpoint(resumed["last_checkpoint"])
    for name, tensor in a["decoder_state"].items():
        assert torch.equal(tensor, b["decoder_state"][name]), name
    assert a["history"]["train_reward"] == b["history"]["train_reward"]
    assert a["history"]["val_cider"] == b["history"]["val_cider"]


def test_scst_needs_a_cross_entropy_checkpoint(tiny_shapes, tmp_path):
    with pytest.raises(ToolkitError, match="SCST is the second stage"):
        solver.train(scst_cfg(tiny_shapes, tmp_path))
    with pytest.raises(ToolkitError, match="scst_samples.* must be at least 2 with scst_baseline 'mean'"):
        solver.train(scst_cfg(tiny_shapes, tmp_path, scst_samples=1, checkpoint="x"))


def test_the_reward_uses_the_train_references(tiny_shapes, xe_run, tmp_path):
    import config
    import training

    trainer = training.Trainer(config.validate_cfg(scst_cfg(tiny_shapes, tmp_path, checkpoint=xe_run["best_checkpoint"])))
    trainer.lock.release()
    assert round(float(np.exp(trainer.stage.reward.log_documents))) == len(trainer.train_loader.dataset) == 24
