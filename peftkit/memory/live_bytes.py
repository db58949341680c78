"""A light tracker of live tensor-storage bytes, for real tensors and for fake ones alike.

Every tensor lives in a storage; a storage's memory is held until the last tensor (or view, or autograd saved
tensor) that uses it is gone. So "bytes of live storages" is exactly what a caching allocator must hand out,
before its rounding and caching. The tracker is a `TorchDispatchMode`: each op's outputs are looked at once, each
new storage is recorded with its size, and a weak reference to it subtracts the size again when the storage dies
(torch keeps a storage's Python object alive as long as the storage itself, so the callback fires at the right
time). Storages that exist before tracking (parameters, buffers, inputs) are added with `add`.

It is ~20x cheaper than `torch.distributed._tools.mem_tracker.MemTracker` because it does nothing per module and
nothing for views, and it runs unchanged over `FakeTensorMode`: the same code measures a real CPU step (the ground
truth in the tests) and a fake 72B step.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class PhaseStats:
    """Live-bytes figures of one phase: at its start, its peak, and at its end."""

    start: int = 0
    peak: int = 0
    end: int = 0


@dataclass
class LiveBytes:
    """Running count of live storage bytes with the overall peak and the phase it happened in."""

    current: int = 0
    peak: int = 0
    peak_phase: str = "setup"
    phase: str = "setup"
    phases: dict[str, PhaseStats] = field(default_factory=dict)
    _refs: dict[int, tuple[weakref.ref, int]] = field(default_factory=dict)

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count the storages of `tensors` (each storage once) if they are not counted yet."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add_storage(t)

    def _add_storage(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested): not ours
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        known = self._refs.get(key)
        if known is not None:
            if known[1] == nbytes:
                return
            self.current -= known[1]  # resized in place: count the new size
        self._refs[key] = (weakref.ref(storage, lambda _r: self._free(key)), nbytes)
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        stats = self.phases.get(self.phase)
        if stats is not None and self.current > stats.peak:
            stats.peak = self.current

    def _free(self, key: int) -> None:
        entry = self._refs.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def set_phase(self, name: str) -> None:
        """Attribute what follows to phase `name` (forward, backward, optimizer step...); phases run in sequence."""
        if self.phase in self.phases:
            self.phases[self.phase].end = self.current
        self.phase = name
        if name not in self.phases:
            self.phases[name] = PhaseStats(start=self.current, peak=self.current)

    def note(self, t: torch.Tensor) -> None:
        """Count the storage of one tensor (an op's output) if it is new."""
        self._add_storage(t)


class StorageTracker(TorchDispatchMode):
    """Dispatch mode feeding every op output into a `LiveBytes` counter.

    Use it innermost (entered after `FakeTensorMode`) so it sees the tensors that mode creates:

        counter = LiveBytes(); counter.add(model.parameters())
        with StorageTracker(counter):
            counter.set_phase("forward")
            loss = model(ids, labels=ids).loss
    """

    def __init__(self, counter: LiveBytes) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.counter.note(leaf)
        return out
