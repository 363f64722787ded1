"""Data-parallel training under torchrun: 2 CPU processes (gloo) on the tiny shapes data against one process.

With dropout 0 and no attention regularisation (whose per-caption mean is weighted by tokens across ranks),
2 processes x batch B read, between them, the samples of 1 process x batch 2B, so their weights agree
within float tolerance. The runs are shared by the tests of the module (each launch costs seconds).
"""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from checkpoints import RunLock, RunPaths, load_checkpoint, run_name
from config import validate_cfg
from conftest import tiny_cfg
from distributed import Ranks, contiguous_slice, differing_keys, shard_indices
from solver import train
from training import Trainer
from utils import Terminated, ToolkitError, process_alive, quiet_when_the_main_process_is_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES_PER_CAPTION_BATCH = 5  # captions_per_image of the tiny data: batch_size // 5 images per batch
WEIGHT_TOLERANCE = 5e-5  # Adam's first steps turn float-rounding differences of the gradients into ~1e-5
LAUNCH_TIMEOUT_S = 240


def ddp_cfg(data, folder, **overrides):
    return tiny_cfg(data, folder, decoder="attention", alpha_c=0.0, dropout=0.0, val_metric="cider", **overrides)


def cli_options(cfg):
    """The `solver.py train` options of a cfg."""
    options = []
    for key, value in cfg.items():
        option = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            options.append(option if value else "--no-" + key.replace("_", "-"))
        else:
            options += [option, "none" if value is None else str(value)]
    return options


def torchrun_command(cfg, processes=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "solver.py", "train", *cli_options(cfg)]


def launch_env():
    return dict(os.environ, OMP_NUM_THREADS="1", CAPTIONING_DDP_TIMEOUT_S="60")


def torchrun_train(cfg):
    """Run `torchrun --nproc_per_node 2 solver.py train ...`; returns its stdout."""
    result = subprocess.run(torchrun_command(cfg), cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def last_checkpoint(cfg):
    return load_checkpoint(RunPaths(run_name(validate_cfg(dict(cfg))), cfg["output_folder"]).last)


def assert_same_weights(a, b):
    for part in ("encoder_state", "decoder_state"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert not key.startswith("module."), key
            torch.testing.assert_close(a[part][key].float(), b[part][key].float(), rtol=0, atol=WEIGHT_TOLERANCE,
                                       msg=lambda text: f"{part}[{key}]: {text}")


@pytest.fixture(scope="module")
def runs(tiny_shapes, tmp_path_factory):
    """The runs the tests compare (batches in captions: 5 per image; 24 TRAIN images):
    ddp: 2 processes x 12 images, one epoch = one step; single: 1 process x 24 images, one epoch = one step;
    ddp_resumed: `single` resumed by 2 processes x 8 images for an epoch (2 steps); single_resumed: `single`
    resumed by 1 process x 16 images."""
    work = tmp_path_factory.mktemp("ddp")
    folders = {name: work / name for name in ("ddp", "single", "ddp_resumed", "single_resumed", "ddp_then_single")}
    cfgs = {"ddp": ddp_cfg(tiny_shapes, folders["ddp"], batch_size=12 * IMAGES_PER_CAPTION_BATCH),
            "single": ddp_cfg(tiny_shapes, folders["single"], batch_size=24 * IMAGES_PER_CAPTION_BATCH)}
    stdout = {"ddp": torchrun_train(cfgs["ddp"])}
    listing = sorted(os.listdir(folders["ddp"]))
    events = os.listdir(folders["ddp"] / "tensorboard" / os.listdir(folders["ddp"] / "tensorboard")[0])
    train(dict(cfgs["single"]))
    single_last = RunPaths(run_name(validate_cfg(dict(cfgs["single"]))), str(folders["single"])).last
    resumed = dict(epochs=2, checkpoint=single_last, cache_folder=str(folders["single"]))
    cfgs["ddp_resumed"] = ddp_cfg(tiny_shapes, folders["ddp_resumed"], batch_size=8 * IMAGES_PER_CAPTION_BATCH,
                                  **resumed)
    cfgs["single_resumed"] = ddp_cfg(tiny_shapes, folders["single_resumed"], batch_size=16 * IMAGES_PER_CAPTION_BATCH,
                                     **resumed)
    stdout["ddp_resumed"] = torchrun_train(cfgs["ddp_resumed"])
    train(dict(cfgs["single_resumed"]))
    return {"data": tiny_shapes, "cfgs": cfgs, "folders": folders, "stdout": stdout, "ddp_listing": listing, "ddp_events": events}


def test_one_step_of_2_processes_equals_one_process_with_the_double_batch(runs):
    ddp, single = last_checkpoint(runs["cfgs"]["ddp"]), last_checkpoint(runs["cfgs"]["single"])
    assert ddp["step"] == single["step"] == 1
    assert_same_weights(ddp, single)
    assert ddp["history"]["train_loss"] == pytest.approx(single["history"]["train_loss"], rel=1e-6)


def test_an_epoch_of_2_processes_equals_one_process_and_a_single_process_checkpoint_resumes_under_ddp(runs):
    ddp, single = last_checkpoint(runs["cfgs"]["ddp_resumed"]), last_checkpoint(runs["cfgs"]["single_resumed"])
    assert ddp["history"]["epoch"] == single["history"]["epoch"] == [0, 1]
    assert ddp["step"] == single["step"] == 1 + 2
    assert_same_weights(ddp, single)
    for key in ("train_loss", "val_loss", "val_top5", "val_bleu4", "val_cider"):
        assert ddp["history"][key] == pytest.approx(single["history"][key], rel=1e-5, abs=1e-12), key


def test_only_rank_0_writes_files_and_prints(runs):
    cfg = runs["cfgs"]["ddp"]
    name = run_name(validate_cfg(dict(cfg)))
    assert runs["ddp_listing"] == sorted([f"BEST_checkpoint_{name}.pth.tar", f"checkpoint_{name}.pth.tar",
                                          f"{name}.metrics.csv", "tensorboard",
                                          f"TRAIN_FEATURES_{cfg['data_name']}_resnet18.hdf5",
                                          f"VAL_FEATURES_{cfg['data_name']}_resnet18.hdf5"])
    assert len(runs["ddp_events"]) == 1  # one TensorBoard writer
    stdout = runs["stdout"]["ddp"]
    assert stdout.count(" * LOSS - ") == 1
    assert stdout.count("Caching TRAIN features") == 1


def test_the_feature_cache_is_built_once_by_both_ranks_and_equals_a_single_process_build(runs):
    name = runs["cfgs"]["ddp"]["data_name"]
    for split in ("TRAIN", "VAL"):
        file = f"{split}_FEATURES_{name}_resnet18.hdf5"
        with h5py.File(runs["folders"]["ddp"] / file) as ddp, h5py.File(runs["folders"]["single"] / file) as single:
            np.testing.assert_array_equal(ddp["features"][:], single["features"][:])
            assert ddp.attrs["fingerprint"] == single.attrs["fingerprint"]
    assert "Caching TRAIN features" not in runs["stdout"]["ddp_resumed"]  # a complete cache is read, not rebuilt
    # each rank encoded its half: the parts printed by rank 0 hold 12 of the 24 TRAIN images
    assert "Caching TRAIN features of resnet18: 12 images" in runs["stdout"]["ddp"]


def test_val_metrics_of_2_processes_equal_one_process_on_the_checkpoint_which_then_resumes(runs):
    """A Trainer in this process, resuming the 2-process checkpoint, validates its weights as the 2 ranks
    did; then it trains on like the single-process run resumed after the same epoch."""
    cfgs, folders = runs["cfgs"], runs["folders"]
    ddp_last = RunPaths(run_name(validate_cfg(dict(cfgs["ddp"]))), str(folders["ddp"])).last
    cfg = ddp_cfg(runs["data"], folders["ddp_then_single"], batch_size=16 * IMAGES_PER_CAPTION_BATCH, epochs=2,
                  checkpoint=ddp_last,
                  cache_folder=str(folders["single"]))
    trainer = Trainer(validate_cfg(cfg))
    saved = load_checkpoint(ddp_last)["history"]
    validated = trainer.validate(0)
    validated["val_cider"] = trainer.validate_by_decoding(0)
    for key, value in validated.items():
        assert value == pytest.approx(saved[key][0], rel=1e-6, abs=1e-12), key
    result = trainer.run()
    assert result["history"]["epoch"] == [0, 1]
    assert_same_weights(load_checkpoint(result["last_checkpoint"]), last_checkpoint(cfgs["single_resumed"]))


def rank_pid(launcher_pid, rank):
    """The pid of the torchrun worker of `rank` (a child of the launcher with RANK=<rank> in its environment)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as file:
                environment = file.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environment:
            return int(entry)
    return None


def kill_a_rank_after_the_first_epoch(cfg, metrics_csv, victim, settle_s=0.0):
    """Train cfg under torchrun (2 processes); once the first epoch wrote `metrics_csv`, and `settle_s` later,
    SIGKILL rank `victim`. Returns torchrun's exit code and output, which must come within 90 s of the kill."""
    process = subprocess.Popen(torchrun_command(cfg), cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not os.path.exists(metrics_csv):  # the first epoch is done: training runs
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.1)
        time.sleep(settle_s)
        pid = rank_pid(process.pid, victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, output


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_run_on_the_other_with_a_message_naming_it(runs, tmp_path):
    """An SCST run (sampling through the plain decoder, gradients all-reduced by hand) trains an epoch under
    torchrun; then rank 1 is killed."""
    single = runs["cfgs"]["single"]
    cfg = ddp_cfg(runs["data"], tmp_path, epochs=1000, training="scst", scst_samples=2, max_steps=8,
                  checkpoint=RunPaths(run_name(validate_cfg(dict(single))), single["output_folder"]).last,
                  cache_folder=single["cache_folder"])
    name = run_name(validate_cfg(dict(single))) + "_scst"
    returncode, output = kill_a_rank_after_the_first_epoch(cfg, tmp_path / f"{name}.metrics.csv", 1)
    assert returncode != 0
    assert "local_rank: 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    # rank 0 says why it stopped: its collective failed, or torchrun's SIGTERM came first
    assert "error: rank 0 of 2 stopped: a collective failed" in output or "terminated (SIGTERM)" in output
    assert "Traceback" not in output.split("torch/distributed/elastic")[0]  # none from rank 0
    lock = RunLock(str(tmp_path / f".{name}.lock"))  # released, or left by a dead process (a resume takes it over)
    assert not os.path.exists(lock.path) or lock.owner() is None or not process_alive(lock.owner())
    assert not [file for file in os.listdir(tmp_path) if file.endswith(".tmp")]
    assert load_checkpoint(RunPaths(name, str(tmp_path)).last)["epoch"] >= 0  # it resumes like any killed run


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's process through /proc")
@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_with_loader_workers_ends_the_other_with_one_line(tiny_shapes, tmp_path, victim):
    """Loader workers (workers 1): the surviving rank's workers get torchrun's SIGTERM too and hand their
    batches through shared memory; the surviving rank still prints one line, and none of its workers a traceback."""
    cfg = ddp_cfg(tiny_shapes, tmp_path, epochs=1000, workers=1, batch_size=10)
    name = run_name(validate_cfg(dict(cfg)))
    returncode, output = kill_a_rank_after_the_first_epoch(cfg, tmp_path / f"{name}.metrics.csv", victim,
                                                           settle_s=0.3)  # into the next epoch
    assert returncode != 0
    assert f"local_rank: {victim}" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    # the ranks' output: before torchrun's summary of the failure, without torchrun's log lines
    before_torchrun = "\n".join(line for line in output.split("failed (exitcode")[0].splitlines()
                                 if "torch/distributed/elastic" not in line)
    survivor = 1 - victim
    stopped = [f"error: rank {survivor} of 2 stopped: ", "terminated (SIGTERM): nothing half-written"]
    assert sum(before_torchrun.count(line) for line in stopped) == 1, before_torchrun[-3000:]
    for noise in ("Traceback", "killed by signal", "damaged", "Error:"):
        assert noise not in before_torchrun, before_torchrun[-3000:]
    if victim == 1:  # rank 0 releases its lock and leaves no temporary file (a kill -9 of rank 0 may leave both)
        assert not os.path.exists(tmp_path / f".{name}.lock")
        assert not [file for file in os.listdir(tmp_path) if file.endswith(".tmp")]
    assert load_checkpoint(RunPaths(name, str(tmp_path)).last)["epoch"] >= 0


def test_failures_after_a_dead_peer_are_one_line(capsys):
    """What a rank meets when another rank dies: gloo's error, the loader's error raised while handling it, a
    batch whose worker is gone (the resource sharer's connection): each a ToolkitError of one line."""
    ranks = Ranks(rank=1, world_size=2)
    def gloo():
        return RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:45199")

    def loader():
        return RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    def reset():
        return ConnectionResetError(104, "Connection reset by peer")
    cases = [(gloo, None, "a collective failed.*Connection closed by peer"),
             (loader, gloo, "a collective failed.*Connection closed by peer"),
             (loader, None, "its data loader lost a worker process.*RuntimeError: DataLoader worker"),
             (reset, None, "its data loader lost the connection to a worker process.*ConnectionResetError")]
    for error, context, message in cases:
        with pytest.raises(ToolkitError, match="^rank 1 of 2 stopped: " + message) as raised:
            with ranks.failures_named():
                try:
                    if context is not None:
                        raise context()
                finally:
                    raise error()
        assert "\n" not in str(raised.value) and raised.value.__suppress_context__
    with pytest.raises(Terminated):
        with ranks.failures_named():
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
    with pytest.raises(ValueError):
        with ranks.failures_named():
            raise ValueError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        with ranks.failures_named():
            raise RuntimeError("a bug")
    assert capsys.readouterr().err.count("error: rank 1 of 2 failed:") == 1


def test_a_loader_worker_prints_no_traceback_for_a_closed_connection(capsys):
    quiet_when_the_main_process_is_gone(ConnectionResetError, ConnectionResetError(104, "reset"), None)
    quiet_when_the_main_process_is_gone(EOFError, EOFError(), None)
    assert capsys.readouterr().err == ""
    quiet_when_the_main_process_is_gone(ValueError, ValueError("a bug"), None)
    assert "ValueError: a bug" in capsys.readouterr().err


def test_ranks_given_different_cfgs_are_named_by_key():
    cfgs = [{"seed": 0, "epochs": 2, "device": "cpu"}, {"seed": 1, "epochs": 2, "device": "cpu"}]
    assert differing_keys(cfgs) == ["seed"]
    Ranks().check_same_cfg(cfgs[0])  # a world of one has nothing to compare


def test_shards_cover_every_item_once():
    for length in (7, 8):
        assert sorted(shard_indices(length, 0, 3) + shard_indices(length, 1, 3) + shard_indices(length, 2, 3)) == \
            list(range(length))
        slices = [contiguous_slice(length, rank, 3) for rank in range(3)]
        assert slices[0][0] == 0 and slices[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
