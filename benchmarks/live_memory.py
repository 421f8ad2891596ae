"""Exact peak of live tensor memory on the CPU, independent of the allocator and of other processes.

Resident-set sampling (`bench_understanding.PeakMemory`) sees what the process holds, including the allocator's
caches and whatever it happens to return to the system late, and varies from run to run. `LiveTensorMemory` counts
the bytes of every tensor storage created while it is active, minus those freed, and keeps the maximum: the CPU
counterpart of `torch.cuda.max_memory_allocated`. It intercepts every operator (a `TorchDispatchMode`), so it slows
the run: measure it in a run of its own, not in a timed one. Works in any torch >= 2.1 (also the official side's).
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    """`with LiveTensorMemory() as memory: ...`; then `memory.peak` (bytes) above what was alive before."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        # Outputs that share an input's storage (views such as `weight.t()`, in-place results) allocate nothing; a
        # view of a tensor made before the mode (a weight) must not count as a new allocation either.
        inputs = {
            tensor.untyped_storage().data_ptr()
            for tensor in tree_flatten((args, kwargs))[0]
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
        }
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self.track(storage)
        return output

    def track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.tracked:  # views share their base's storage
            return
        self.tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.release, key, size)

    def release(self, key: int, size: int) -> None:
        self.live -= size
        self.tracked.discard(key)
