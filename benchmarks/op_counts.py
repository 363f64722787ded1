"""Counts of what a piece of code asks of the device, the same on every machine: the aten operations it
dispatches (each a kernel launch on a GPU, in eager mode) and the host synchronisations (a value read back
from a tensor the code computed: `.item()`, `float()`, `bool()`, `.tolist()`, `.numpy()`).

    with OpCounter() as counts:
        trainer.train_step(batch)
    counts.operations, counts.synchronisations, counts.where_synchronised
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
    """Counts aten operations and host synchronisations inside its `with` block. A `.tolist()` or `.numpy()`
    counts as a synchronisation when its tensor was computed inside the block (on a GPU it would live on the
    device); tensors made before the block, such as the loader's lengths, are the host's own."""

    def __init__(self):
        super().__init__()
        self.by_operation = collections.Counter()
        self.where_synchronised = []  # a short stack for each synchronisation
        self._computed = {}  # id -> weak reference of each tensor computed inside the block
        self._saved_methods = {}

    @property
    def operations(self):
        return sum(self.by_operation.values())

    @property
    def synchronisations(self):
        return len(self.where_synchronised)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.by_operation[str(func.overloadpacket.__name__)] += 1
        if func is SCALAR_READ:
            self._note_synchronisation()
        result = func(*args, **kwargs)
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs:
                self._computed[id(tensor)] = weakref.ref(tensor)
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
            computed = counter._computed.get(id(tensor))
            if computed is not None and computed() is tensor:
                counter._note_synchronisation()
            return method(tensor, *args, **kwargs)
        return read_back
