"""Where a training run starts, decided before any work: what it resumes, under which name, what it may
overwrite, and what BEST must hold.

`resolve_start(cfg, word_map)` checks the checkpoint to resume (or, for SCST, the cross-entropy run whose
weights it starts from) against the cfg and the data, names the run, takes its lock, and refuses what would
lose work: replacing a finished run, or rewinding a run to an older checkpoint. It returns a `RunStart`;
nothing of the training loop is needed to call it.
"""
import dataclasses
import os
import shlex

from checkpoints import RunLock, RunPaths, check_resume_keys, load_checkpoint, run_name, save_checkpoint
from config import CFG_SCHEMA, MODEL_KEYS, default_cfg, upgrade_cfg
from utils import ToolkitError, check_writable_folder

RESUME_OPTION_SKIP = ("checkpoint", "overwrite", "attention", "device")  # not repeated in the resume command


@dataclasses.dataclass
class RunStart:
    """The resolved start of a run."""
    run_name: str
    paths: RunPaths
    lock: RunLock  # held by the main process until the run ends
    checkpoint: dict | None  # the checkpoint resumed or whose weights are taken; None for a fresh run
    resumes: bool  # True: go on with the checkpoint's run (optimisers, counters, history); False: a new run
    fine_tune_encoder: bool  # the cfg's value, or True when the resumed run fine-tunes its encoder


def resolve_start(cfg, word_map, is_main=True):
    """The checked start of the run cfg describes; raises ToolkitError, naming the file and the fix, for a start
    that cannot work or would overwrite or rewind earlier work. The main process takes the run's lock."""
    if cfg["training"] == "scst" and not cfg["checkpoint"]:
        raise ToolkitError("SCST is the second stage: it starts from a model trained with cross-entropy; pass its "
                           "checkpoint (cfg['checkpoint'], --checkpoint BEST_checkpoint_<run>.pth.tar)")
    checkpoint = load_resume(cfg, word_map) if cfg["checkpoint"] else None
    fine_tune = cfg["fine_tune_encoder"]
    if checkpoint is not None and checkpoint.get("encoder_optimizer") is not None and not fine_tune:
        print("note: the checkpoint fine-tunes its encoder, so fine-tuning goes on (fine_tune_encoder = True)")
        fine_tune = True
    resumes = checkpoint is not None and checkpoint["cfg"]["training"] == cfg["training"]
    if checkpoint is not None and not resumes:
        check_next_stage(cfg, checkpoint)
    name = start_name(dict(cfg, fine_tune_encoder=fine_tune), checkpoint, resumes)
    paths = RunPaths(name, cfg["output_folder"])
    check_writable_folder(cfg["output_folder"], "cfg['output_folder'] (--output-folder)")
    lock = RunLock(paths.lock)
    if is_main:  # the other ranks' pids may live on other machines
        lock.acquire()
    try:
        if resumes:
            refuse_to_rewind(cfg, paths, checkpoint)
            repair_best(cfg, paths, checkpoint, is_main)
        else:
            refuse_to_overwrite(cfg, paths)
    except BaseException:
        lock.release()
        raise
    return RunStart(name, paths, lock, checkpoint, resumes, fine_tune)


def load_resume(cfg, word_map):
    """The checkpoint cfg['checkpoint'], checked against the cfg (model keys, word map, epochs left)."""
    path = cfg["checkpoint"]
    checkpoint = load_checkpoint(path)
    check_resume_keys(checkpoint, path)
    checkpoint["cfg"] = upgrade_cfg(checkpoint["cfg"], path)
    saved = checkpoint["cfg"]
    for key in MODEL_KEYS:
        if saved[key] != cfg[key]:
            raise ToolkitError(f"cfg[{key!r}] = {cfg[key]!r} but checkpoint {path!r} was "
                               f"trained with {saved[key]!r}; use the checkpoint's value to resume")
    if checkpoint["word_map"] != word_map:
        raise ToolkitError(word_map_mismatch(path, cfg["data_folder"], cfg["data_name"]))
    if saved["training"] == cfg["training"] and checkpoint["epoch"] + 1 >= cfg["epochs"]:
        raise ToolkitError(f"checkpoint {path!r} has trained epochs 0 to {checkpoint['epoch']} and cfg['epochs'] "
                           f"= {cfg['epochs']}: nothing is left to train; raise epochs (--epochs) to train on")
    return checkpoint


def word_map_mismatch(checkpoint_path, data_folder, data_name):
    return (f"the word map of checkpoint {checkpoint_path!r} differs from WORDMAP_{data_name}.json in "
            f"{data_folder!r}; the checkpoint was trained on other data: use the data folder it was trained on")


def check_next_stage(cfg, checkpoint):
    """A checkpoint of another stage only starts SCST from cross-entropy weights; that run is left as it is."""
    trained = checkpoint["cfg"]["training"]
    if trained != "xe" or cfg["training"] != "scst":
        raise ToolkitError(f"checkpoint {cfg['checkpoint']!r} was trained with training = {trained!r}; it can "
                           f"resume a {trained!r} run or start an 'scst' run from an 'xe' one, not a "
                           f"{cfg['training']!r} run")
    print(f"Starting the SCST stage from the weights of {cfg['checkpoint']!r} (epoch {checkpoint['epoch']} of its "
          f"cross-entropy run, which is left as it is)")


def start_name(cfg, checkpoint, resumes):
    """cfg['run_name']; else a resumed run's own name; else <data>_<decoder>_<encoder>[_finetune], with
    _scst after the name of the cross-entropy run an SCST run starts from."""
    if cfg["run_name"] or checkpoint is None:
        return run_name(cfg)
    saved = checkpoint["cfg"]
    name = saved["run_name"] or run_name(dict(saved, fine_tune_encoder=cfg["fine_tune_encoder"]))
    return name if resumes else f"{name}_scst"


def refuse_to_overwrite(cfg, paths):
    """A new run must not silently replace the checkpoints of an earlier run of the same name."""
    existing = [path for path in (paths.best, paths.last) if os.path.exists(path)]
    if existing and not cfg["overwrite"]:
        # Without the last checkpoint (a kill while the first one was written) BEST holds the run's newest epoch.
        resume, newest = (paths.last, "") if os.path.exists(paths.last) else (
            paths.best, f" (its last checkpoint was never written: {os.path.basename(paths.best)} holds its "
                        f"newest epoch)")
        raise ToolkitError(
            f"{existing[0]!r} already holds a run named {paths.name!r}{newest}; resume it with "
            f"cfg['checkpoint'] = {resume!r} (--checkpoint), give this run another "
            f"cfg['run_name'] (--run-name), or set cfg['overwrite'] = True (--overwrite) to replace it")


def refuse_to_rewind(cfg, paths, checkpoint):
    """Resuming from an older checkpoint (e.g. BEST) would overwrite the run's newer last checkpoint."""
    last = paths.last
    if not os.path.isfile(last) or os.path.abspath(last) == os.path.abspath(cfg["checkpoint"]):
        return
    last_epoch = load_checkpoint(last).get("epoch", -1)
    if last_epoch > checkpoint["epoch"] and not cfg["overwrite"]:
        raise ToolkitError(
            f"{last!r} holds epoch {last_epoch}, newer than epoch {checkpoint['epoch']} of "
            f"{cfg['checkpoint']!r}; resuming from the older one would overwrite it. Resume from "
            f"{last!r}, continue under another cfg['run_name'] (--run-name), or set cfg['overwrite'] = True "
            f"(--overwrite) to train on from epoch {checkpoint['epoch']}")


def repair_best(cfg, paths, checkpoint, is_main):
    """When the resumed checkpoint's own epoch is the best of its history but BEST holds another epoch (a kill
    while BEST was written by an earlier version, which wrote it after the last checkpoint), rewrite BEST."""
    scores = checkpoint["history"].get(f"val_{cfg['val_metric']}", [])
    if not scores or checkpoint["history"]["epoch"][scores.index(max(scores))] != checkpoint["epoch"]:
        return
    best = paths.best
    best_epoch = load_checkpoint(best).get("epoch") if os.path.isfile(best) else None
    if best_epoch != checkpoint["epoch"] and is_main:
        print(f"note: {best!r} holds epoch {best_epoch}, but the best epoch of the history is {checkpoint['epoch']}: "
              f"rewriting it from {cfg['checkpoint']!r}")
        save_checkpoint({key: value for key, value in checkpoint.items() if key not in ("format", "format_version")},
                        best)


def resume_command(cfg, last_checkpoint):
    """What to say after Ctrl-C or SIGTERM: the command that resumes the run from its last checkpoint."""
    if not os.path.isfile(last_checkpoint):
        return "\nStopped before the first epoch ended: no checkpoint was written; run the same command to start again."
    defaults = default_cfg()
    options = [f"--{key.replace('_', '-')} {shlex.quote(str(value))}" if not isinstance(value, bool)
               else f"--{'' if value else 'no-'}{key.replace('_', '-')}"
               for key, value in cfg.items()
               if key in CFG_SCHEMA and key not in RESUME_OPTION_SKIP and value != defaults[key]]
    return (f"\nStopped. To resume after epoch {load_checkpoint(last_checkpoint)['epoch']}:\n"
            f"  python solver.py train {' '.join(options)} --checkpoint {shlex.quote(last_checkpoint)}")
