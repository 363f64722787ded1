"""Data-parallel training over several processes started by torchrun (PyTorch's DistributedDataParallel).

`torchrun --nproc_per_node N solver.py train ...` (or several machines with --nnodes/--rdzv-endpoint) sets
RANK, WORLD_SIZE and LOCAL_RANK in every process; `Ranks.from_environment(device)` joins the process group
(NCCL with one GPU per process, cuda:LOCAL_RANK, or gloo on the CPU) and a process started without them
is a world of one, for which every function here is a no-op. Collectives are torch.distributed's own.
"""
import contextlib
import datetime
import hashlib
import inspect
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from utils import Terminated, ToolkitError, worker_terminated

TIMEOUT_VARIABLE = "CAPTIONING_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800  # a rank waits this long in one collective (a barrier while another builds a cache)
MAX_TIMEOUT_S = 30 * 24 * 3600  # 30 days: longer is no timeout at all, and overflows timedelta and torch's clocks
# Words of gloo's and NCCL's errors when a peer is gone or a collective timed out
COLLECTIVE_FAILURES = ("gloo", "NCCL", "Connection closed", "Connection reset", "imed out", "Broken pipe")
# DDP's option not to broadcast buffers at every forward (renamed in recent torch; broadcast_buffers before)
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})


def launched_by_torchrun():
    """True in a process that torchrun (or another launcher setting RANK and WORLD_SIZE) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def collective_timeout():
    """How long a collective may wait for the other ranks: $CAPTIONING_DDP_TIMEOUT_S seconds, 1800 by default."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise ToolkitError(f"environment variable {TIMEOUT_VARIABLE} = {text!r}; set it to a positive number of "
                           f"seconds, at most {MAX_TIMEOUT_S} (30 days) (default {DEFAULT_TIMEOUT_S})")
    return datetime.timedelta(seconds=seconds)


class Ranks:
    """This process's place among the training processes: rank, world size, device, and the collectives
    the training loop needs. A world of one (no torchrun) runs every method without communicating."""

    def __init__(self, rank=0, world_size=1, device=torch.device("cpu"), owns_group=False):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.owns_group = owns_group  # this object initialised the process group and destroys it

    @classmethod
    def from_environment(cls, device):
        """Join torchrun's process group (once per process) on `device`'s backend; a world of one outside torchrun.

        On CUDA each process takes the GPU cuda:LOCAL_RANK, whatever index `device` names."""
        device = torch.device(device)
        if not launched_by_torchrun():
            return cls(device=device)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            # Every rank of the node refuses (not only those without a GPU, while the others wait in
            # init_process_group): LOCAL_WORLD_SIZE is the number of processes torchrun started on this machine.
            local_world = max(local_rank + 1, int(os.environ.get("LOCAL_WORLD_SIZE") or 0))
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if local_world > gpus:
                raise ToolkitError(f"torchrun started {local_world} processes on this machine (LOCAL_WORLD_SIZE; "
                                   f"this one has LOCAL_RANK {local_rank}) but it has {gpus} GPU(s), one per process "
                                   f"needed; start at most {gpus} per node (--nproc_per_node {gpus}), or train on "
                                   f"the CPU (--device cpu)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
        return cls(dist.get_rank(), dist.get_world_size(), device, owns_group)

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def wrap(self, module):
        """`module` in DistributedDataParallel (its trained parameters' gradients all-reduced in backward);
        the module itself in a world of one or when it trains nothing. Buffers are not broadcast at each
        forward, so a rank may run a forward (validation) without the others. On CUDA its BatchNorm layers
        become SyncBatchNorm (statistics of the global batch, same parameters and state_dict keys); gloo has
        no SyncBatchNorm, so on the CPU each rank normalises with its own batch's statistics."""
        if not self.distributed or not any(p.requires_grad for p in module.parameters()):
            return module
        if self.device.type != "cuda":
            return DDP(module, **NO_BUFFER_SYNC)
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DDP(module, device_ids=[self.device], **NO_BUFFER_SYNC)

    # ------------------------------------------------------------ collectives

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def gather(self, value):
        """[value of rank 0, value of rank 1, ...] on every rank (picklable plain data)."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def from_main(self, compute):
        """compute() run on rank 0 alone, its result (plain data) given to every rank."""
        if not self.distributed:
            return compute()
        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *numbers):
        """The sums over the ranks of a few numbers (float64)."""
        totals = torch.tensor(numbers, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(totals)
        return totals.tolist()

    def loss_weight(self, count):
        """The factor of a rank's mean loss over `count` items so that DDP's average of the ranks' gradients
        is the gradient of the mean over all ranks' items (as one process with the whole global batch). A 0-d
        tensor on the device, never read by the host: the step does not wait for the all-reduce."""
        if not self.distributed:
            return 1.0
        total = torch.full((), float(count), device=self.device)  # filled on the device: no copy to wait for
        dist.all_reduce(total)
        return count * self.world_size / total

    def average_gradients(self, module):
        """All-reduce the gradients of `module`'s trained parameters and divide by the world size, in one
        flat buffer (what DDP does in backward, for a step that did not go through DDP's forward)."""
        if not self.distributed:
            return
        parameters = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (total parameters,)
        dist.all_reduce(flat)
        flat /= self.world_size
        for parameter, part in zip(parameters, flat.split([g.numel() for g in grads])):
            parameter.grad = part.view_as(parameter).clone()

    def check_same_cfg(self, cfg):
        """Refuse to train when the ranks were given different cfgs (each rank's hash, then the keys)."""
        hashes = self.gather(cfg_hash(cfg))
        if len(set(hashes)) == 1:
            return
        cfgs = self.gather(comparable_cfg(cfg))
        keys = differing_keys(cfgs)
        raise ToolkitError(f"the {self.world_size} training processes were given different cfgs (rank {self.rank} "
                           f"sees cfg hashes {hashes}); they differ in {', '.join(map(repr, keys))}: start every "
                           f"rank with the same command and options")

    # ------------------------------------------------------------ one writer

    def tqdm_disabled(self):
        """tqdm's `disable`: progress bars on rank 0 only."""
        return not self.is_main

    @contextlib.contextmanager
    def quiet_unless_main(self):
        """stdout goes nowhere on ranks other than 0 (their errors still reach stderr)."""
        if self.is_main:
            yield
            return
        with open(os.devnull, "w", encoding="utf-8") as devnull, contextlib.redirect_stdout(devnull):
            yield

    @contextlib.contextmanager
    def failures_named(self):
        """An exception on this rank is reported with the rank before it propagates (torchrun then stops
        the other ranks); a collective broken by another rank's death, and the failures of the data loader's
        workers that follow it (a worker gone, a batch's shared memory whose worker is gone), become a one-line
        error saying so."""
        try:
            yield
        except ToolkitError as error:
            if self.distributed:
                raise ToolkitError(f"rank {self.rank} of {self.world_size}: {error}") from None
            raise
        except (RuntimeError, ConnectionError, EOFError) as error:
            if worker_terminated(error):  # the process group's SIGTERM reached a loader worker first
                raise Terminated() from None
            if not self.distributed:
                raise
            failure = peer_failure(error)
            if failure is None:
                print(f"error: rank {self.rank} of {self.world_size} failed:", file=sys.stderr)
                raise
            what, cause = failure
            raise ToolkitError(f"rank {self.rank} of {self.world_size} stopped: {what}, most likely because another "
                               f"rank crashed or was killed (torchrun's summary names it): "
                               f"{first_line(cause)[:300]}") from None


def first_line(error):
    """`TypeName: the first line of its message`, or the type's name alone."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def peer_failure(error):
    """(what broke, in words, the error that says so) when `error`, or an error it was raised while handling, is a
    collective that failed or a data loader that lost a worker or a batch from one; None for any other error."""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for error in chain:
        text = str(error).splitlines()[0] if str(error) else ""
        if isinstance(error, dist.DistBackendError) or (
                isinstance(error, RuntimeError) and any(word in text for word in COLLECTIVE_FAILURES)):
            return "a collective failed", error
    for error in chain:
        if isinstance(error, RuntimeError) and "DataLoader worker" in str(error):
            return "its data loader lost a worker process", error
        if isinstance(error, (ConnectionError, EOFError)):  # a batch's shared memory, handed over by its worker
            return "its data loader lost the connection to a worker process", error
    return None


def unwrapped(module):
    """The module inside a DistributedDataParallel wrapper, or `module` itself."""
    return module.module if isinstance(module, DDP) else module


def comparable_cfg(cfg):
    """The cfg as JSON-able plain data (devices as text)."""
    return {key: value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
            for key, value in cfg.items()}


def cfg_hash(cfg):
    return hashlib.sha256(json.dumps(comparable_cfg(cfg), sort_keys=True).encode()).hexdigest()[:16]


def differing_keys(cfgs):
    """The keys whose values are not the same in every cfg of the list."""
    keys = sorted(set().union(*cfgs))
    return [key for key in keys if len({json.dumps(c.get(key)) for c in cfgs}) > 1]


def shard_indices(length, rank, world_size):
    """The items of a split that one rank evaluates: every world_size-th from `rank`, none twice."""
    return list(range(rank, length, world_size))


def contiguous_slice(length, rank, world_size):
    """(start, end) of the rank's contiguous share of `length` items (the first ranks take one more)."""
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
