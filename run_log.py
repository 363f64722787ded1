"""Curves while a run trains: `<run>.metrics.csv` beside the checkpoints and TensorBoard event files.

    log = RunLog(output_folder, run_name, only_writer=rank == 0)
    log.step(global_step, {"train/loss": loss})   # per training step
    log.epoch(history)                            # after each epoch: {key: [value per epoch]}
    log.close()

The CSV is rewritten atomically after every epoch (one row per epoch, one column per history key) and
`read_metrics_csv` reads it back as a history dict. The events go to `<output_folder>/tensorboard/<run>/`,
so `tensorboard --logdir <output_folder>` shows every run of the folder while it trains. Without the
tensorboard package a note is printed once and the CSV alone is written.

Logs are a convenience and never stop a run: when writing the CSV or the events fails (a folder made
read-only, a file replaced by a folder, a full disk), a note names the file and why, once, later writes to that
log are skipped, and training goes on. The checkpoints, which hold the same history, are what must not fail
silently.
"""
import contextlib
import csv
import functools
import numbers
import os
import sys
import threading

from utils import ToolkitError, atomic_path, check_writable_folder

METRICS_SUFFIX = ".metrics.csv"
TENSORBOARD_FOLDER = "tensorboard"
EPOCH_TAG_PREFIX = "epoch/"  # per-epoch scalars are "epoch/<history key>", apart from per-step tags


def metrics_csv_path(output_folder, run_name):
    return os.path.join(output_folder, run_name + METRICS_SUFFIX)


def tensorboard_folder(output_folder, run_name):
    return os.path.join(output_folder, TENSORBOARD_FOLDER, run_name)


def quiet_event_writer_threads():
    """TensorBoard writes events in a thread of its own, which prints a traceback when a write fails; the next
    call of the writer raises the same error, which RunLog reports. Silence that thread's traceback (the hook of
    every other thread stays as it was)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writers", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, Exception):
            return
        previous(args)
    hook.quiets_event_writers = True
    threading.excepthook = hook


def reason(error):
    """Why a write failed, in a few words."""
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@functools.cache
def summary_writer_class():
    """torch's SummaryWriter, or None (after a note, printed once per process) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises ImportError or ModuleNotFoundError without the package
        print(f"note: no TensorBoard event files are written ({error}); the metrics CSV still is. "
              f"To get them: pip install 'tensorboard>=2.14'", file=sys.stderr)
        return None
    return SummaryWriter


class RunLog:
    """The metrics CSV and TensorBoard events of one run; with only_writer=False (DDP ranks != 0) it does nothing.
    A log whose write fails is reported once and written no more (see the module's docstring)."""

    def __init__(self, output_folder, run_name, only_writer=True):
        self.enabled = only_writer
        self.csv_path = metrics_csv_path(output_folder, run_name)
        self.events_folder = tensorboard_folder(output_folder, run_name)
        self.writer = None
        self.csv_failed = False
        self.logged_rows = None  # history rows whose scalars are in the event files; None before the first epoch
        if not self.enabled:
            return
        check_writable_folder(output_folder, "the run's output folder")
        writer_class = summary_writer_class()
        if writer_class is not None:
            try:
                self.writer = writer_class(log_dir=self.events_folder)
            except Exception as error:  # tensorboard raises OSError, or its own errors for a bad folder
                self.events_failed(error)
            else:
                quiet_event_writer_threads()

    def events_failed(self, error):
        """Report a failed write of the TensorBoard events, once, and write no more of them."""
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # it fails again on its way out
                writer.close()
        print(f"note: the TensorBoard events of this run in {self.events_folder!r} cannot be written "
              f"({reason(error)}); training goes on without them (the metrics CSV and the checkpoints hold the "
              f"history). For the next run, make it a writable folder again", file=sys.stderr)

    def write_events(self, write):
        """write(writer), or nothing once the events have failed."""
        if self.writer is None:
            return
        try:
            write(self.writer)
        except Exception as error:
            self.events_failed(error)

    def step(self, global_step, scalars):
        """Add per-step scalars {tag: number}, e.g. {"train/loss": 2.3}, at x = global_step."""
        def add(writer):
            for tag, value in scalars.items():
                writer.add_scalar(tag, float(value), global_step)
        self.write_events(add)

    def epoch(self, history):
        """Rewrite the CSV from the whole history and add the new epochs' numeric values as scalars
        `epoch/<key>` at x = epoch + 1 (epochs counted from 1, as in the figures).

        The first call adds only the history's last epoch: earlier ones, in a resumed run, were added by
        the run that trained them. Later calls add every epoch after those already added.
        """
        if not self.enabled:
            return
        columns = aligned_columns(history)
        self.write_csv(columns)
        n_rows = len(next(iter(columns.values()), []))
        first_new = n_rows - 1 if self.logged_rows is None else self.logged_rows

        def add(writer):
            for row in range(max(first_new, 0), n_rows):
                self._add_epoch_scalars(writer, columns, row)
            writer.flush()
        self.write_events(add)
        self.logged_rows = n_rows

    def write_csv(self, columns):
        if self.csv_failed:
            return
        try:
            write_metrics_csv(self.csv_path, columns)
        except (OSError, ToolkitError) as error:  # ToolkitError: a full disk, which atomic_path words
            self.csv_failed = True
            why = str(error) if isinstance(error, ToolkitError) else reason(error)
            print(f"note: the metrics CSV {self.csv_path!r} cannot be written ({why}); training goes on without it "
                  f"(the checkpoints hold the history). For the next run, make it a writable file again",
                  file=sys.stderr)

    @staticmethod
    def _add_epoch_scalars(writer, columns, row):
        epoch = columns["epoch"][row] if "epoch" in columns else row
        for key, values in columns.items():
            if key != "epoch" and is_number(values[row]):
                writer.add_scalar(EPOCH_TAG_PREFIX + key, float(values[row]), int(epoch) + 1)

    def close(self):
        """Close the event file; a failure is reported as a note, never raised (it may run while another error
        ends the run)."""
        self.write_events(lambda writer: writer.close())
        self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def is_number(value):
    """A real number, not a bool: what TensorBoard can draw."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def aligned_columns(history):
    """{key: [value per epoch]} with every list as long as the longest, a shorter one padded with None
    at the front: a key that appeared later in the run (a metric first computed at epoch k) has no
    values for the epochs before it."""
    n_rows = max((len(values) for values in history.values()), default=0)
    return {key: [None] * (n_rows - len(values)) + list(values) for key, values in history.items()}


def write_metrics_csv(path, columns):
    """Write aligned columns as a CSV, one row per epoch, atomically; None is an empty cell."""
    rows = zip(*columns.values())
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([["" if value is None else value for value in row] for row in rows])


def read_metrics_csv(path):
    """The history dict {key: [value per epoch]} of a `<run>.metrics.csv`: ints, floats, strings, None
    for empty cells."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ToolkitError(f"cannot read the metrics CSV {path!r} ({error}); pass a <run>.metrics.csv "
                           f"written by a training run") from None
    if not rows or any(len(row) != len(rows[0]) for row in rows):
        raise ToolkitError(f"the metrics CSV {path!r} is empty or has rows of another length than its header: "
                           f"it was not written by run_log; pass a <run>.metrics.csv written by a training run")
    header, *rows = rows
    return {key: [_parse_cell(row[column]) for row in rows] for column, key in enumerate(header)}


def _parse_cell(text):
    """'' -> None, '3' -> 3, '0.25' -> 0.25 (also nan, inf), anything else stays text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
