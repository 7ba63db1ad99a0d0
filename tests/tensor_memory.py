"""The largest number of bytes that tensors allocated by a block of code held at once, on any device.

torch keeps a peak only for CUDA memory. :class:`PeakTensorBytes` is a dispatch mode that sees every
operation's result: a result whose storage is new (not one of the operation's inputs', as views and in-place
results are) is counted until its storage is freed, which is checked at every operation, so the peak is exact at
the granularity of operations (scratch memory inside one kernel is not seen). Storages that existed before (the
cache, the inputs) are not counted: the peak is what the code adds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes() as memory: ...`` then ``memory.peak``: bytes of new tensor storages alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        self._forget_freed()
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and _key(tensor) not in inputs and _key(tensor) not in self._live:
                storage = tensor.untyped_storage()
                self._live[_key(tensor)] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return result

    def _forget_freed(self) -> None:
        for key, (reference, nbytes) in list(self._live.items()):
            if reference.expired():
                del self._live[key]
                self.current -= nbytes


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
