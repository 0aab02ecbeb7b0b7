"""Count what a step costs a GPU, on any device: dispatched aten ops and reads of device values.

On a GPU the host queues kernels while the device works; every read of a device value (``.item()``,
``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``) stops the host until the device has
caught up, and every dispatched op is (at least) one kernel launch. Both can be counted on the CPU:
:class:`StepCounter` is a ``TorchDispatchMode`` that counts every aten op it sees, and tracks which
tensors would live on the device ("tainted": the model's parameters and buffers, whatever else the
caller names, every tensor that requires grad (the image's parameters), and every output of an op that read a tainted tensor; a factory's output is not, since a
``device=`` argument cannot be told from the default here). A scalar read (``aten._local_scalar_dense``) or a host copy (``.cpu()``, ``.tolist()``,
``.numpy()``, ``.to("cpu")``) of a tainted tensor is a device read; reads of tensors that stay on the
host on a GPU too (random draws from the slots' CPU generators) are not.

>>> import torch
>>> w = torch.ones(3)
>>> with StepCounter([w]) as c:
...     y = (w * 2).sum()
...     _ = float(y)
...     _ = float(torch.ones(1))   # a host tensor: not a device read
>>> c.ops, c.reads
(5, 1)
"""

from __future__ import annotations

from typing import Any, Iterable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["StepCounter", "reads_are_free", "steady_state_counts"]

_COUNTING = 0  # StepCounters active


def reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs nothing: a CPU tensor, and no :class:`StepCounter`
    active. Code that reads a value only to save work (e.g. to skip a branch) does so only then; while a
    counter runs, CPU tensors take the path a GPU takes, so that the count is the GPU's."""
    return t.device.type == "cpu" and _COUNTING == 0

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default


def _tensors(obj: Any, out: List[torch.Tensor], depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, torch.nn.Module):
        out.extend(obj.parameters())
        out.extend(obj.buffers())
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors(v, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            if isinstance(v, (torch.Tensor, dict, list, tuple)):
                _tensors(v, out, depth + 1)


class StepCounter(TorchDispatchMode):
    """Counts aten ops (``ops``) and device reads (``reads``) while active; see the module docstring.

    ``sources``: tensors, modules or containers of them that live on the device. ``read_sites`` lists the
    reads (the op, and the innermost line of vital_fast that made it: for a failing test's message).
    """

    def __init__(self, sources: Iterable[Any] = ()) -> None:
        super().__init__()
        self.ops = 0
        self.device_ops = 0  # ops that read a device tensor: kernel launches on a GPU
        self.reads = 0
        self.read_sites: List[str] = []
        self._dev = WeakIdKeyDictionary()
        found: List[torch.Tensor] = []
        _tensors(list(sources), found)
        for t in found:
            self._mark(t)
        self._patched: List[tuple] = []

    def _mark(self, t: torch.Tensor) -> None:
        try:
            self._dev[t] = True
        except TypeError:  # pragma: no cover - a tensor type that cannot be weakly referenced
            pass

    def on_device(self, t: torch.Tensor) -> bool:
        return isinstance(t, torch.Tensor) and t in self._dev

    def _read(self, what: str) -> None:
        import traceback

        self.reads += 1
        here = next((f"{f.filename.split('vital_fast/')[-1]}:{f.lineno}" for f in reversed(traceback.extract_stack())
                     if "vital_fast" in f.filename and not f.filename.endswith("counting.py")), "?")
        self.read_sites.append(f"{what} @ {here}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        flat, _ = tree_flatten((args, kwargs))
        ins = [a for a in flat if isinstance(a, torch.Tensor)]
        tainted = any(a.requires_grad or self.on_device(a) for a in ins)
        if tainted:
            self.device_ops += 1
        if func is _SCALAR_READ and tainted:
            self._read(str(func))
        out = func(*args, **kwargs)
        if tainted and func is not _SCALAR_READ:
            outs, _ = tree_flatten(out)
            for o in outs:
                if isinstance(o, torch.Tensor):
                    self._mark(o)
        return out

    # host copies that do not dispatch on a CPU tensor: counted at the Python level
    def __enter__(self):
        counter = self

        def wrap(name):
            orig = getattr(torch.Tensor, name)

            def patched(t, *a, **k):
                host = counter.on_device(t) and (name != "to" or _to_host(a, k))
                if host:
                    counter._read(f"Tensor.{name}")
                out = orig(t, *a, **k)
                if host and isinstance(out, torch.Tensor):
                    counter._dev.pop(out, None)  # a host copy (on the CPU, the same tensor)
                return out

            setattr(torch.Tensor, name, patched)
            self._patched.append((name, orig))

        for name in ("cpu", "tolist", "numpy", "to"):
            wrap(name)
        global _COUNTING
        _COUNTING += 1
        return super().__enter__()

    def __exit__(self, *exc):
        global _COUNTING
        _COUNTING -= 1
        try:
            return super().__exit__(*exc)
        finally:
            for name, orig in reversed(self._patched):
                setattr(torch.Tensor, name, orig)
            self._patched.clear()


def _to_host(a, k) -> bool:
    dev = k.get("device", a[0] if a else None)
    if isinstance(dev, (str, torch.device)):
        try:
            return torch.device(dev).type == "cpu"
        except RuntimeError:
            return False
    return False


def steady_state_counts(run, steps: int, sources: Iterable[Any] = ()) -> dict:
    """Aten ops (all, and those on device tensors) and device reads per steady-state step of ``run(n_steps)`` (a whole visualization of
    ``n_steps`` steps): the difference between a run of ``2 * steps`` and one of ``steps``, divided by
    ``steps``, so that set-up, references and the first steps cancel (after one uncounted run that fills
caches, e.g. the prototypes). ``{"ops": ..., "reads": ...,
    "read_sites": [...]}`` (the sites of the longer run's reads)."""
    run(steps)
    counts = []
    for n in (steps, 2 * steps):
        with StepCounter(sources) as c:
            run(n)
        counts.append(c)
    a, b = counts
    return {"ops": (b.ops - a.ops) / steps, "device_ops": (b.device_ops - a.device_ops) / steps,
            "reads": (b.reads - a.reads) / steps,
            "read_sites": sorted(set(b.read_sites))}
