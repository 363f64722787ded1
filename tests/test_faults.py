"""Faults a user meets while training: kills and SIGTERM at every moment, a full disk, a second run of the same
name, resuming from the wrong file. Each ends with a message, nothing half written, and nothing good lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import solver
from checkpoints import RunLock, load_checkpoint
from conftest import tiny_cfg
from utils import ToolkitError, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "fault_harness.py")
EPOCHS = 3


def fault_cfg(data, folder, **overrides):
    """Three quick epochs of the decoder without attention; a learning rate at which val BLEU-4 rises every
    epoch, so that epoch 1 writes BEST."""
    return tiny_cfg(data, folder, **{"decoder": "rnn", "epochs": EPOCHS, "decoder_lr": 3e-2, "batch_size": 10, **overrides})


def run_harness(moment, signal_name, cfg):
    return subprocess.run([sys.executable, HARNESS, moment, signal_name, json.dumps(cfg)], capture_output=True,
                          text=True, timeout=600)


def temp_files(*folders):
    return [name for folder in folders if os.path.isdir(folder) for name in os.listdir(folder)
            if name.endswith(".tmp")]


def best_epoch_of(history):
    scores = history["val_bleu4"]
    return history["epoch"][scores.index(max(scores))]


@pytest.fixture(scope="module")
def reference_run(tiny_shapes, tmp_path_factory):
    """The uninterrupted run that every killed and resumed run must end like."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = solver.train(fault_cfg(tiny_shapes, folder))
    history = load_checkpoint(result["last_checkpoint"])["history"]
    assert best_epoch_of(history) >= 1, "the fault tests need a run whose epoch 1 or later is best"
    return history


@pytest.mark.parametrize("moment, signal_name", [
    ("cache", "KILL"), ("mid_epoch", "KILL"), ("validation", "KILL"), ("last", "KILL"), ("best", "KILL"),
    ("mid_epoch", "TERM"), ("last", "TERM"),
])
def test_a_killed_run_resumes_losing_at_most_the_epoch_in_progress(tiny_shapes, tmp_path, reference_run, moment,
                                                                   signal_name):
    cache = tmp_path / "cache"
    cfg = fault_cfg(tiny_shapes, tmp_path / "out", cache_folder=str(cache), deterministic=True)
    killed = run_harness(moment, signal_name, cfg)
    if signal_name == "KILL":
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    else:  # SIGTERM ends like Ctrl-C: exit 143, a message, no traceback, nothing half written
        assert killed.returncode == 143, killed.stderr[-2000:]
        assert "Traceback" not in killed.stderr and "terminated (SIGTERM)" in killed.stderr
        assert temp_files(tmp_path / "out", cache) == []
        assert "--checkpoint" in killed.stdout
    last = os.path.join(cfg["output_folder"], f"checkpoint_{tiny_shapes.data_name}_rnn_resnet18.pth.tar")
    if os.path.exists(last):
        assert load_checkpoint(last)["epoch"] == 0  # the epoch in progress (1) is lost, no more
        cfg["checkpoint"] = last
    resumed = run_harness("none", "KILL", cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if signal_name == "KILL" and moment != "cache":
        assert "removed 1 temporary file" in resumed.stdout or moment in ("mid_epoch", "validation")
    assert temp_files(tmp_path / "out", cache) == []
    final = load_checkpoint(last)
    assert final["history"]["epoch"] == list(range(EPOCHS))
    torch.testing.assert_close(final["history"]["val_bleu4"], reference_run["val_bleu4"])
    best = load_checkpoint(last.replace("checkpoint_", "BEST_checkpoint_"))
    assert best["epoch"] == best_epoch_of(final["history"])


def session_gone(session, wait_s=10):
    """True once no process of the session (the harness, its loader workers) is left."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_to_the_process_group_with_loader_workers_ends_as_a_plain_sigterm(tiny_shapes, tmp_path):
    """`kill -- -PGID` (a job's kill, a scheduler's pre-emption, `timeout`) reaches the loader workers too: the
    run still ends as a plain SIGTERM, not with "DataLoader worker killed by signal" raised during its shutdown."""
    cfg = fault_cfg(tiny_shapes, tmp_path, workers=2)
    process = subprocess.Popen([sys.executable, HARNESS, "mid_epoch", "TERM_GROUP", json.dumps(cfg)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr and "damaged" not in stderr, stderr[-3000:]
    assert "terminated (SIGTERM)" in stderr
    last = os.path.join(cfg["output_folder"], f"checkpoint_{tiny_shapes.data_name}_rnn_resnet18.pth.tar")
    assert "To resume after epoch 0" in stdout and f"--checkpoint {last}" in stdout
    assert load_checkpoint(last)["epoch"] == 0
    assert temp_files(tmp_path) == [] and not os.path.exists(tmp_path / f".{tiny_shapes.data_name}_rnn_resnet18.lock")
    assert session_gone(process.pid)  # no loader worker outlives the run


def test_a_loader_worker_killed_by_sigterm_exits_as_sigterm(capsys):
    """Should a worker die of the group's SIGTERM before it could ignore it, torch's error is the termination."""
    def main(argv):
        raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated. ")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main)
    finally:
        signal.signal(signal.SIGTERM, previous)  # run_cli's handler is for command lines, not for pytest
    assert exit_info.value.code == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err


def test_a_second_run_of_the_same_name_is_refused_while_the_first_trains(tiny_shapes, tmp_path):
    cfg = fault_cfg(tiny_shapes, tmp_path)
    lock = tmp_path / f".{tiny_shapes.data_name}_rnn_resnet18.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(sleeper.pid))
        with pytest.raises(ToolkitError, match=f"another process \\(pid {sleeper.pid}\\) is training"):
            solver.train(cfg)
    finally:
        sleeper.kill()
        sleeper.wait()
    solver.train(dict(cfg, epochs=1))  # the lock of a process that is gone is taken over
    assert not lock.exists()


def test_a_lock_of_a_live_unrelated_process_says_removing_it_is_safe(tmp_path):
    """A stale lock whose pid now belongs to another program: the refusal names the lock file and the way past."""
    lock = str(tmp_path / ".run.lock")
    with open(lock, "w") as file:
        file.write(str(os.getppid()))  # alive, and not a training run
    with pytest.raises(ToolkitError) as raised:
        RunLock(lock).acquire()
    message = str(raised.value)
    assert f"lock file {lock!r}" in message
    assert "If no run of this name is going on" in message and f"removing {lock!r} is safe" in message
    os.remove(lock)  # as the message says
    RunLock(lock).acquire().release()
    assert not os.path.exists(lock)


def test_a_run_killed_while_writing_its_first_last_checkpoint_is_told_to_resume_from_best(tiny_shapes, tmp_path):
    """kill -9 while the first last checkpoint is written leaves BEST alone: the refusal names BEST, which resumes."""
    result = solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=1))
    os.remove(result["last_checkpoint"])
    with pytest.raises(ToolkitError) as raised:
        solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=2))
    best = result["best_checkpoint"]
    assert f"cfg['checkpoint'] = {best!r} (--checkpoint)" in str(raised.value)
    assert "last checkpoint was never written" in str(raised.value)
    resumed = solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=2, checkpoint=best))  # as the message says
    assert load_checkpoint(resumed["last_checkpoint"])["history"]["epoch"] == [0, 1]


def test_a_fresh_run_refuses_a_folder_with_a_last_checkpoint_but_no_best(tiny_shapes, tmp_path):
    result = solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=1))
    os.remove(result["best_checkpoint"])
    before = open(result["last_checkpoint"], "rb").read()
    with pytest.raises(ToolkitError, match="already holds a run"):
        solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=1))
    assert open(result["last_checkpoint"], "rb").read() == before


def test_resuming_from_best_while_the_last_checkpoint_is_newer_is_refused(tiny_shapes, tmp_path):
    result = solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=2))
    older = tmp_path / "older.pth.tar"
    shutil.copy(result["last_checkpoint"], older)
    solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=3, checkpoint=result["last_checkpoint"]))
    before = open(result["last_checkpoint"], "rb").read()
    with pytest.raises(ToolkitError, match="newer than epoch 1"):
        solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=4, checkpoint=str(older)))
    assert open(result["last_checkpoint"], "rb").read() == before
    solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=3, checkpoint=str(older), overwrite=True))


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_is_needed(tiny_shapes, tmp_path):
    cfg = fault_cfg(tiny_shapes, tmp_path / "out", epochs=1)
    first = solver.train(cfg)
    before = open(first["last_checkpoint"], "rb").read()
    resume = dict(cfg, epochs=2, checkpoint=first["last_checkpoint"])
    # a file size limit makes every write past 1 MB fail as a full disk does
    limited = ("import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    full = subprocess.run([sys.executable, "-c", limited, HARNESS, "none", "KILL", json.dumps(resume)],
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    assert "the disk is full" in full.stderr and "it needs about" in full.stderr and "MB" in full.stderr
    assert open(first["last_checkpoint"], "rb").read() == before
    assert temp_files(tmp_path / "out") == []


def test_logs_that_cannot_be_written_after_epoch_0_do_not_stop_the_run(tiny_shapes, tmp_path, monkeypatch, capsys):
    """The TensorBoard run folder replaced by a file and the metrics CSV by a folder after epoch 0: a note for
    each, and training goes on to its last epoch."""
    import run_log

    real_epoch = run_log.RunLog.epoch
    events = run_log.tensorboard_folder(str(tmp_path), f"{tiny_shapes.data_name}_rnn_resnet18")
    csv_path = run_log.metrics_csv_path(str(tmp_path), f"{tiny_shapes.data_name}_rnn_resnet18")

    def epoch_then_break_the_logs(self, history):
        real_epoch(self, history)
        if history["epoch"] == [0]:
            shutil.rmtree(events)
            open(events, "w").close()
            os.remove(csv_path)
            os.mkdir(csv_path)
    monkeypatch.setattr(run_log.RunLog, "epoch", epoch_then_break_the_logs)
    result = solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=3))
    assert load_checkpoint(result["last_checkpoint"])["history"]["epoch"] == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.count("note: the TensorBoard events of this run in") == 1 and err.count("note: the metrics CSV") == 1
    assert "Traceback" not in err and ".tmp" not in err
    assert temp_files(tmp_path) == []


def make_read_only(folder):
    """Make `folder` unwritable, for root too (chattr +i, where chmod does not stop root); returns the undo.
    Skips the test where neither works."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return lambda: os.chmod(folder, 0o755)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("root cannot make a folder read-only here (no chattr +i)")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_output_folder_made_read_only_names_the_checkpoint_not_written(tiny_shapes, tmp_path, monkeypatch, capsys):
    """After epoch 0 the output folder becomes read-only: epoch 1 trains, its checkpoint cannot be written, and the
    error says so (which file, why, what is intact), not that the lock file could not be removed."""
    import run_log

    out = tmp_path / "out"
    real_epoch, undo = run_log.RunLog.epoch, []

    def epoch_then_read_only(self, history):
        real_epoch(self, history)
        if history["epoch"] == [0]:
            undo.append(make_read_only(out))
    monkeypatch.setattr(run_log.RunLog, "epoch", epoch_then_read_only)
    try:
        with pytest.raises(ToolkitError) as raised:
            solver.train(fault_cfg(tiny_shapes, out, epochs=3))
    finally:
        for step in undo:
            step()
    last = str(out / f"checkpoint_{tiny_shapes.data_name}_rnn_resnet18.pth.tar")
    message = str(raised.value)
    assert message.startswith("epoch 1's checkpoint could not be written to ") and "PermissionError" in message
    assert f"{last!r}, is intact" in message and f"resume from it (--checkpoint {last})" in message
    assert ".tmp" not in message and "lock" not in message
    assert "note: cannot remove the lock file" in capsys.readouterr().err
    assert load_checkpoint(last)["epoch"] == 0
    assert temp_files(out) == []


def test_ctrl_c_says_how_to_resume(tiny_shapes, tmp_path, monkeypatch, capsys):
    first = solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=1))
    import training

    def interrupted(self, epoch):
        raise KeyboardInterrupt
    monkeypatch.setattr(training.Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=2, checkpoint=first["last_checkpoint"]))
    printed = capsys.readouterr().out
    assert "To resume after epoch 0" in printed
    assert f"--checkpoint {first['last_checkpoint']}" in printed
    assert f"--data-folder {tiny_shapes.folder}" in printed and "--decoder rnn" in printed


# ---------------------------------------------------------------- checked before any work is spent

def test_an_output_folder_that_is_a_file_or_cannot_be_made_is_refused_before_training(tiny_shapes, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ToolkitError, match="--output-folder.* is a file, not a folder"):
        solver.train(fault_cfg(tiny_shapes, a_file, epochs=1))
    with pytest.raises(ToolkitError, match="--output-folder.* is not writable"):
        solver.train(fault_cfg(tiny_shapes, a_file / "below", epochs=1))


def test_predictions_json_that_is_a_folder_is_refused_before_the_evaluation(tmp_path):
    with pytest.raises(ToolkitError, match="--predictions-json.* is a folder"):
        solver.test(str(tmp_path / "never-read.pth.tar"), predictions_json=str(tmp_path))


def test_captioning_json_that_is_not_an_object_is_refused(monkeypatch):
    monkeypatch.setenv("CAPTIONING_CFG", "[1, 2]")
    with pytest.raises(ToolkitError, match="CAPTIONING_CFG holds a JSON list, not an object"):
        solver.with_env_overrides({})


@pytest.fixture(scope="module")
def one_epoch(tiny_shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_epoch")
    return solver.train(fault_cfg(tiny_shapes, folder, epochs=1))


def test_resuming_from_a_checkpoint_without_its_optimiser_says_which_key(tiny_shapes, one_epoch, tmp_path):
    checkpoint = torch.load(one_epoch["last_checkpoint"], weights_only=True)
    del checkpoint["decoder_optimizer"]
    path = tmp_path / "stripped.pth.tar"
    torch.save(checkpoint, path)
    with pytest.raises(ToolkitError, match="lacks 'decoder_optimizer'.*for test and caption only"):
        solver.train(fault_cfg(tiny_shapes, tmp_path / "out", epochs=2, checkpoint=str(path)))


def test_resuming_with_another_learning_rate_applies_it(tiny_shapes, one_epoch, tmp_path, capsys):
    folder = tmp_path / "out"
    shutil.copytree(os.path.dirname(one_epoch["last_checkpoint"]), folder)
    last = str(folder / os.path.basename(one_epoch["last_checkpoint"]))
    solver.train(fault_cfg(tiny_shapes, folder, epochs=2, checkpoint=last, decoder_lr=5e-3))
    assert "cfg['decoder_lr'] changed from 0.03 to 0.005" in capsys.readouterr().out
    saved = load_checkpoint(last)
    assert saved["cfg"]["decoder_lr"] == 5e-3
    assert all(group["lr"] == 5e-3 for group in saved["decoder_optimizer"]["param_groups"])


def test_nothing_left_to_train_is_said(tiny_shapes, one_epoch):
    with pytest.raises(ToolkitError, match="nothing is left to train; raise epochs"):
        solver.train(fault_cfg(tiny_shapes, os.path.dirname(one_epoch["last_checkpoint"]), epochs=1,
                               checkpoint=one_epoch["last_checkpoint"]))


def test_a_diverging_loss_stops_and_saves_no_best(tiny_shapes, tmp_path):
    with pytest.raises(ToolkitError, match="training diverged: the loss is .* more than 10 times its first value"):
        solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=1, decoder_lr=1e6, grad_clip=None))
    assert [name for name in os.listdir(tmp_path) if name.endswith(".pth.tar")] == []


def test_non_finite_validation_stops_without_a_best(tiny_shapes, tmp_path, monkeypatch):
    import training

    real_encode = training.Trainer.encode

    def infinite_in_validation(self, inputs):
        out = real_encode(self, inputs)
        return out if self.decoder.training else out * float("inf")
    monkeypatch.setattr(training.Trainer, "encode", infinite_in_validation)
    with pytest.raises(ToolkitError, match="the validation loss at epoch 0 became nan.*VAL images or features"):
        solver.train(fault_cfg(tiny_shapes, tmp_path, epochs=1))
    assert [name for name in os.listdir(tmp_path) if name.endswith(".pth.tar")] == []


def test_beam_sizes_are_checked(one_epoch, tiny_shapes, capsys):
    image = os.path.join(tiny_shapes.folder, "shapes_images", "shapes_000000.jpg")
    for bad in (0, -2):
        with pytest.raises(ToolkitError, match=f"beam_size = {bad} must be a whole number of at least 1"):
            solver.caption(one_epoch["best_checkpoint"], [image], beam_size=bad)
    vocabulary = len(load_checkpoint(one_epoch["best_checkpoint"])["word_map"])
    solver.test(one_epoch["best_checkpoint"], beam_size=vocabulary + 10, coco_metrics=False)
    assert f"larger than the vocabulary ({vocabulary} words); using {vocabulary}" in capsys.readouterr().out


def test_a_checkpoint_of_the_course_code_is_named_as_such(tmp_path):
    from models import DecoderWithRNN

    path = tmp_path / "BEST_checkpoint_coco.pth.tar"
    torch.save({"epoch": 3, "decoder": DecoderWithRNN(8, 8, 10, 16)}, path)  # whole pickled modules
    with pytest.raises(ToolkitError, match="written by the course's train.py.*models.DecoderWithRNN.*import-course"):
        load_checkpoint(str(path))
