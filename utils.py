"""Shared helpers: user-facing errors, atomic files and disk checks, arrays and tables (metrics: metrics.py;
figures: figures.py)."""
import contextlib
import errno
import numbers
import os
import re
import shutil
import signal
import sys
import tempfile
import threading

import numpy as np

# Nothing that takes seconds to import (torch, nltk, pycocoevalcap) is imported here, so that
# create_input_files.py and its image-decoding worker processes, which only need the errors and atomic
# files below, start in a fraction of a second.


class ToolkitError(Exception):
    """An error caused by the user's input; command lines print it without a traceback."""


ANSI_CODE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour and bold codes (torch's errors carry some)


def error_summary(error, limit=200):
    """`Type: first line of the message` of an exception from a library, without terminal codes, at most
    `limit` characters of text: what a message may quote of it."""
    text = ANSI_CODE.sub("", str(error)).strip()
    first_line = text.splitlines()[0].strip() if text else ""
    return f"{type(error).__name__}: {first_line[:limit]}{'...' if len(first_line) > limit else ''}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: temporary files are removed on the way out."""


def raise_terminated(signum, frame):
    # From now on a DataLoader worker that dies is part of the termination, not an error: torch's SIGCHLD handler
    # would raise "worker ... killed by signal" inside whatever runs next (a finally block, the resume command's
    # checkpoint read) and hide the SIGTERM. A handler that does nothing, not SIG_DFL: a SIGCHLD already pending
    # would make Python print "Signal 17 ignored due to race condition".
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, ignore_signal)
    raise Terminated()


def ignore_signal(signum, frame):
    pass


def worker_terminated(error):
    """True for torch's error that a DataLoader worker was killed by SIGTERM: the SIGTERM of the process group
    (kill of a job, a scheduler's pre-emption, `timeout`) reached the worker, and reaches this process too."""
    return isinstance(error, RuntimeError) and "killed by signal: Terminated" in str(error)


def loader_worker_init(worker_id):
    """`worker_init_fn` of the toolkit's DataLoaders. A worker does not die of a SIGTERM sent to its whole process
    group, which its main process gets too; the main process alone handles it (stops its workers as at the end
    of a run, says how to resume) instead of learning from torch that a worker was "killed by signal" in the
    middle of its own shutdown. A SIGTERM from the main process (torch stopping a worker that does not end by
    itself) still ends the worker quietly, as torch's own handler does, and so does one after the main process
    is gone. The signal is blocked in the worker and taken by a thread (sigwaitinfo names its sender); where
    sigwaitinfo is missing (macOS) torch's handling stays. A worker prints no traceback for a connection to the
    main process that broke (see quiet_when_the_main_process_is_gone)."""
    sys.excepthook = quiet_when_the_main_process_is_gone
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch():
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="sigterm-of-the-main-process", daemon=True).start()


def quiet_when_the_main_process_is_gone(kind, value, traceback):
    """sys.excepthook of a loader worker: the thread that hands a batch's shared memory to the main process
    (multiprocessing's resource sharer) meets a closed connection when the main process stops, e.g. after another
    rank of a multi-process run died; the main process says why it stopped, so the worker prints nothing."""
    if issubclass(kind, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(kind, value, traceback)


def run_cli(main, argv=None):
    """Run `main(argv)`, turning ToolkitError, OSError, Ctrl-C and SIGTERM into a one-line message and an
    exit code (2 for errors, 130 for Ctrl-C, 143 for SIGTERM). A DataLoader worker killed by SIGTERM is the
    process group's SIGTERM (see worker_terminated)."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        try:
            main(argv)
        except RuntimeError as error:
            if worker_terminated(error):
                raise Terminated() from None
            raise
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a file the toolkit did not expect to fail: name it
        where = f" {error.filename!r}" if error.filename else ""
        print(f"error: cannot access{where}: {error.strerror or error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        stopped = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"{stopped}: nothing half-written was left behind", file=sys.stderr)
        sys.exit(143 if isinstance(interrupt, Terminated) else 130)


TEMP_SUFFIX = ".tmp"
TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")  # .<name>.<pid>.<random>.tmp
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def temp_prefix(path):
    """The start of the temporary names of `path`: `.<name>.<pid>.`, so a later run can tell whose they are."""
    return f".{os.path.basename(path)}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path, needed_bytes=None):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    Readers never see a half-written file, even after a crash, Ctrl-C or SIGTERM; after a kill -9 the
    temporary file stays, named with the writer's pid, and `remove_stale_temp_files` clears it later.
    A full disk becomes a ToolkitError that says where, how much is free and (given `needed_bytes`) how
    much is needed; the previous file at `path` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; give it a normal file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if no_space_left(error):
            raise ToolkitError(disk_full_message(path, needed_bytes)) from None
        raise


def no_space_left(error):
    """True for a write that failed because the disk (or a quota, or a file size limit) is full; h5py reports
    that as a plain OSError whose text names the errno."""
    text = str(error)
    if not isinstance(error, OSError):
        return False
    return error.errno in NO_SPACE_ERRNOS or "No space left" in text or "File too large" in text \
        or "errno = 28" in text or "errno = 27" in text


def disk_full_message(path, needed_bytes=None):
    folder = os.path.dirname(os.path.abspath(path))
    need = f"; it needs about {format_bytes(needed_bytes)}" if needed_bytes else ""
    return (f"the disk is full: writing {path!r} failed with {format_bytes(shutil.disk_usage(folder).free)} "
            f"free in {folder!r}{need}. The previous version of the file, if any, is intact; free some space "
            f"or write elsewhere")


def format_bytes(count):
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000


def check_free_space(folder, needed_bytes, what, margin_bytes=0, fix="free some space or write elsewhere"):
    """Refuse before any work when `what` ({needed_bytes} bytes, plus a margin left free) does not fit."""
    free = shutil.disk_usage(folder).free
    if needed_bytes + margin_bytes > free:
        margin = f" plus {format_bytes(margin_bytes)} kept free" if margin_bytes else ""
        raise ToolkitError(f"{what} needs {format_bytes(needed_bytes)}{margin} but {folder!r} has only "
                           f"{format_bytes(free)} free; {fix}")


def check_writable_folder(folder, what):
    """Create `folder` if needed and prove it writable before any work is spent; a ToolkitError naming it and
    `what` (e.g. "cfg['output_folder'] (--output-folder)") otherwise."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ToolkitError(f"{what} {folder!r} is a file, not a folder; pass a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ToolkitError(f"{what} {folder!r} is not writable ({error.strerror or error}); pass a folder "
                           f"you can write to") from None


def check_writable_file(path, what):
    """A file about to be written: its folder must be writable and the path must not be a folder."""
    if os.path.isdir(path):
        raise ToolkitError(f"{what} {path!r} is a folder; pass a file name")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), f"the folder of {what}")


def remove_stale_temp_files(folder):
    """Delete the temporary files that killed runs left in `folder` (their writer's pid is gone); return them."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = TEMP_NAME.match(name)
        if match and not process_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {folder!r} by a killed run "
              f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
    return removed


def process_alive(pid):
    """Whether a process with this pid runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def current_umask():
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- arrays and tables

def to_numpy(values):
    """A CPU float array from a numpy array, list or (possibly CUDA, grad-tracking) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


MISSING = "—"


def _cell(value):
    """One markdown cell: floats to 4 decimals, missing as an em dash, pipes escaped."""
    if value is None:
        return MISSING
    is_float = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
    text = f"{value:.4f}" if is_float else str(value)
    return text.replace("|", r"\|").replace("\n", " ")


def markdown_table(rows, columns):
    """A markdown table of `rows` (dicts) with `columns` = [(key, header), ...]."""
    lines = ["| " + " | ".join(_cell(header) for _, header in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)
