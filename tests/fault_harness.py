"""Run `solver.py train` with a fault injected at one moment, for the subprocess tests of test_faults.py.

    python fault_harness.py MOMENT SIGNAL CFG_JSON

MOMENT: cache (while the feature cache is built), mid_epoch (epoch 1, second batch), validation (epoch 1's
validation), last / best (epoch 1's last or BEST checkpoint half written), or none. SIGNAL: KILL or TERM:
the process sends it to itself at that moment; TERM_GROUP: SIGTERM to its whole process group (its loader
workers too; start it in a session of its own). The fault is injected by wrapping the toolkit's functions in
this process only; the toolkit itself has no test hooks.
"""
import collections
import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import features  # noqa: E402
import solver  # noqa: E402
import training  # noqa: E402
from utils import atomic_path, run_cli  # noqa: E402

FAULT_EPOCH = 1


def fault(signal_name):
    if signal_name == "TERM_GROUP":  # what `kill -- -PGID`, a scheduler's pre-emption or `timeout` sends: from
        # another process (a loader worker exits quietly on a SIGTERM from its parent)
        subprocess.Popen(["kill", "-TERM", "--", f"-{os.getpgid(0)}"])
    else:
        os.kill(os.getpid(), getattr(signal, f"SIG{signal_name}"))


def inject(moment, signal_name):
    """Wrap the function that runs at `moment` so that it signals this process there."""
    if moment == "cache":
        real_encode = features.encode_images
        calls = {"n": 0}

        def encode_then_fault(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                fault(signal_name)
            return real_encode(*args, **kwargs)
        features.encode_images = encode_then_fault
    elif moment == "mid_epoch":
        real_step = training.Trainer.train_step
        steps = collections.Counter()  # epoch -> steps taken in it

        def step_then_fault(self, batch):
            epoch = self.state["epoch"] + 1  # the epoch being trained
            steps[epoch] += 1
            if epoch == FAULT_EPOCH and steps[epoch] == 2:
                fault(signal_name)
            return real_step(self, batch)
        training.Trainer.train_step = step_then_fault
    elif moment == "validation":
        real_validate = training.Trainer.validate

        def validate_then_fault(self, epoch):
            if epoch == FAULT_EPOCH:
                fault(signal_name)
            return real_validate(self, epoch)
        training.Trainer.validate = validate_then_fault
    elif moment in ("last", "best"):
        real_save = checkpoints.save_checkpoint

        def save_half_then_fault(state, path):
            wanted = "BEST_checkpoint_" if moment == "best" else "checkpoint_"
            if os.path.basename(path).startswith(wanted) and state.get("epoch") == FAULT_EPOCH:
                with atomic_path(path) as tmp, open(tmp, "wb") as file:
                    file.write(b"half a checkpoint")
                    file.flush()
                    fault(signal_name)
            return real_save(state, path)
        training.save_checkpoint = save_half_then_fault


def main():
    moment, signal_name, cfg_json = sys.argv[1:4]
    if moment != "none":
        inject(moment, signal_name)
    cfg = json.loads(cfg_json)
    run_cli(lambda argv: solver.train(cfg))


if __name__ == "__main__":
    main()
