"""Curves while a run trains: the metrics CSV and the TensorBoard events, written each epoch and read back."""
import math
import os
import shutil
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import run_log
import utils
from run_log import RunLog, read_metrics_csv


def history_after(n_epochs):
    """solver.train's history after n_epochs, plus a CIDEr that is computed from the second epoch on."""
    epochs = list(range(n_epochs))
    history = {"epoch": epochs, "train_loss": [3.0 - 0.25 * e for e in epochs],
               "val_bleu4": [0.1 + 0.1 * e for e in epochs], "lr": [4e-4 * 0.8 ** e for e in epochs],
               "seconds": [np.float32(1.5)] * n_epochs}
    history["val_cider"] = [0.5 * e for e in epochs[1:]]
    return history


def scalars(folder, tag):
    """{step: value} of one tag in the event files of a folder."""
    events = EventAccumulator(folder)
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_csv_and_events_are_written_every_epoch_and_read_back(tmp_path):
    folder = str(tmp_path / "checkpoints")
    events = os.path.join(folder, "tensorboard", "run_a")
    with RunLog(folder, "run_a") as log:
        for epoch in range(3):
            for batch in range(4):
                log.step(epoch * 4 + batch, {"train/loss": 5.0 - epoch - 0.1 * batch})
            history = history_after(epoch + 1)
            log.epoch(history)
            assert read_metrics_csv(os.path.join(folder, "run_a.metrics.csv")) == dict(
                history, val_cider=[None] + history["val_cider"])  # a later key has empty cells before it
            bleu = scalars(events, "epoch/val_bleu4")  # readable while the run goes on
            assert bleu == pytest.approx({e + 1: 0.1 + 0.1 * e for e in range(epoch + 1)})
    assert scalars(events, "epoch/val_cider") == pytest.approx({2: 0.5, 3: 1.0})
    assert scalars(events, "epoch/lr") == pytest.approx({1: 4e-4, 2: 3.2e-4, 3: 2.56e-4})
    assert len(scalars(events, "train/loss")) == 12 and scalars(events, "train/loss")[9] == pytest.approx(2.9)
    assert "epoch/epoch" not in EventAccumulator(events).Reload().Tags()["scalars"]
    assert sorted(os.listdir(folder)) == ["run_a.metrics.csv", "tensorboard"]  # no temp file left


def test_a_resumed_run_adds_only_its_new_epochs(tmp_path):
    with RunLog(str(tmp_path), "run") as log:
        log.epoch(history_after(2))  # the first call of a resumed run: epochs before were logged before
        log.epoch(history_after(4))  # two epochs at once: both added
    assert sorted(scalars(str(tmp_path / "tensorboard" / "run"), "epoch/train_loss")) == [2, 3, 4]


def test_only_the_writer_writes(tmp_path):
    log = RunLog(str(tmp_path / "out"), "run", only_writer=False)
    log.step(0, {"train/loss": 1.0})
    log.epoch(history_after(1))
    log.close()
    assert not os.path.exists(tmp_path / "out")


def test_without_tensorboard_a_note_once_and_the_csv_still(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    run_log.summary_writer_class.cache_clear()
    try:
        for name in ("first", "second"):
            with RunLog(str(tmp_path), name) as log:
                log.step(0, {"train/loss": 1.0})
                log.epoch(history_after(2))
    finally:
        run_log.summary_writer_class.cache_clear()
    assert capsys.readouterr().err.count("note: no TensorBoard event files") == 1
    assert read_metrics_csv(str(tmp_path / "second.metrics.csv"))["val_bleu4"] == pytest.approx([0.1, 0.2])
    assert not os.path.exists(tmp_path / "tensorboard")


def test_csv_keeps_floats_exact_and_non_finite_values(tmp_path):
    path = str(tmp_path / "x.metrics.csv")
    history = {"epoch": [0, 1], "val_loss": [1 / 3, math.inf], "note": ["a, b", "c"]}
    run_log.write_metrics_csv(path, history)
    back = read_metrics_csv(path)
    assert back["epoch"] == [0, 1] and back["val_loss"] == [1 / 3, math.inf] and back["note"] == ["a, b", "c"]
    run_log.write_metrics_csv(path, {"epoch": [0], "val_loss": [math.nan]})
    assert math.isnan(read_metrics_csv(path)["val_loss"][0])


def test_a_broken_csv_is_refused_with_its_name(tmp_path):
    path = tmp_path / "bad.metrics.csv"
    path.write_text("epoch,val_loss\n0,1.0,7\n")
    with pytest.raises(utils.ToolkitError, match="bad.metrics.csv"):
        read_metrics_csv(str(path))
    with pytest.raises(utils.ToolkitError, match="missing.metrics.csv"):
        read_metrics_csv(str(tmp_path / "missing.metrics.csv"))


# ---------------------------------------------------------------- a log that cannot be written never stops a run

def replace_by_file(path):
    shutil.rmtree(path)
    open(path, "w").close()


def replace_by_folder(path):
    os.remove(path)
    os.mkdir(path)


def event_file(folder):
    return os.path.join(folder, next(name for name in os.listdir(folder) if name.startswith("events.")))


@pytest.mark.parametrize("sabotage", ["run folder replaced by a file", "event file replaced by a folder",
                                      "run folder read-only"])
def test_events_that_cannot_be_written_are_noted_once_and_skipped(tmp_path, capsys, sabotage):
    if sabotage.endswith("read-only") and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = str(tmp_path / "checkpoints")
    events = os.path.join(folder, "tensorboard", "run")
    log = RunLog(folder, "run")
    log.step(0, {"train/loss": 1.0})
    log.epoch(history_after(1))
    if sabotage == "run folder replaced by a file":
        replace_by_file(events)
    elif sabotage == "event file replaced by a folder":
        replace_by_folder(event_file(events))
    else:
        os.chmod(event_file(events), 0o444)
        os.chmod(events, 0o555)
    for epoch in (1, 2):
        for step in range(3):
            log.step(epoch * 3 + step, {"train/loss": 1.0})
            time.sleep(0.05)  # the writer's thread meets the failure on its own
        log.epoch(history_after(epoch + 1))
    log.close()
    err = capsys.readouterr().err
    assert err.count("note: the TensorBoard events of this run in") == 1 and repr(events) in err, err
    assert "Traceback" not in err and "Exception in thread" not in err
    assert read_metrics_csv(os.path.join(folder, "run.metrics.csv"))["epoch"] == [0, 1, 2]  # the CSV goes on


def test_a_metrics_csv_that_cannot_be_written_is_noted_once_and_skipped(tmp_path, capsys):
    folder = str(tmp_path / "checkpoints")
    csv_path = os.path.join(folder, "run.metrics.csv")
    with RunLog(folder, "run") as log:
        log.epoch(history_after(1))
        replace_by_folder(csv_path)
        log.epoch(history_after(2))
        log.epoch(history_after(3))
    err = capsys.readouterr().err
    assert err.count("note: the metrics CSV") == 1 and f"{csv_path!r} cannot be written (IsADirectoryError" in err
    assert ".tmp" not in err
    assert sorted(os.listdir(folder)) == ["run.metrics.csv", "tensorboard"]  # no temporary file left
    assert sorted(scalars(os.path.join(folder, "tensorboard", "run"), "epoch/val_bleu4")) == [1, 2, 3]  # events go on
