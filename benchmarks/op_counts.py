"""Counts of what a piece of code asks of the device, the same on every machine: the aten operations it
dispatches (each a kernel launch on a GPU, in eager mode) and its host synchronisations (a value read back from
a tensor on the device: `.item()`, `float()`, `bool()`, `.tolist()`, `.numpy()`).

    with OpCounter(on_device=[*model.parameters(), *model.buffers(), batch_features]) as counts:
        loss = step(batch)
    counts.operations, counts.computing_operations, counts.synchronisations, counts.where_synchronised

On a CPU every tensor is on the host, so the counter follows which tensors a GPU run would keep on the device:
those given as `on_device` (the model's weights, the batch moved to the device) and every result of an
operation that reads one of them. Tensors made from host values alone (the loader's lengths, a list turned
into a tensor) stay on the host, as they would on a GPU.
"""
import collections
import os
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SCALAR_READ = torch.ops.aten._local_scalar_dense.default  # what .item(), float(), bool() and int() dispatch
READS_BACK = ("tolist", "numpy", "__array__")  # Tensor methods that read values without dispatching an op


class OpCounter(TorchDispatchMode):
    """Counts aten operations and host synchronisations inside its `with` block."""

    def __init__(self, on_device=()):
        super().__init__()
        self.by_operation = collections.Counter()
        self.views = 0  # operations that only make a view (t, view, slice, detach, ...): no kernel on a GPU
        self.where_synchronised = []  # a short stack for each synchronisation
        self._on_device = {}  # id -> weak reference of each tensor that a GPU run keeps on the device
        for tensor in on_device:
            self._mark(tensor)
        self._saved_methods = {}

    @property
    def operations(self):
        return sum(self.by_operation.values())

    @property
    def computing_operations(self):
        """The operations that compute (every one but the views): the kernels an eager GPU step launches."""
        return self.operations - self.views

    @property
    def synchronisations(self):
        return len(self.where_synchronised)

    def _mark(self, tensor):
        self._on_device[id(tensor)] = weakref.ref(tensor)

    def is_on_device(self, tensor):
        ref = self._on_device.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.by_operation[func.overloadpacket.__name__] += 1
        self.views += func.is_view
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        reads_device = any(self.is_on_device(t) for t in inputs)
        if func is SCALAR_READ and reads_device:
            self._note_synchronisation()
        result = func(*args, **kwargs)
        if reads_device:
            for tensor in tree_flatten(result)[0]:
                if isinstance(tensor, torch.Tensor):
                    self._mark(tensor)
        return result

    def _note_synchronisation(self):
        frames = [frame for frame in traceback.extract_stack()
                  if "/torch/" not in frame.filename and not frame.filename.endswith("op_counts.py")]
        self.where_synchronised.append(" <- ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"
                                                   for f in reversed(frames[-3:])))

    def __enter__(self):
        for name in READS_BACK:
            self._saved_methods[name] = method = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved_methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, method):
        counter = self

        def read_back(tensor, *args, **kwargs):
            if counter.is_on_device(tensor):
                counter._note_synchronisation()
            return method(tensor, *args, **kwargs)
        return read_back


def trainer_tensors(trainer, loaded):
    """What a GPU run of `trainer` keeps on the device: its models' weights and buffers, its optimisers' state,
    and the inputs and captions of the loader's batch `loaded` (not its lengths: they stay on the host)."""
    tensors = [*trainer.encoder_module.parameters(), *trainer.encoder_module.buffers(),
               *trainer.decoder_module.parameters(), *trainer.decoder_module.buffers(), loaded[0], loaded[1]]
    for optimizer in trainer.optimizers.active:
        tensors += [value for state in optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
    return tensors
