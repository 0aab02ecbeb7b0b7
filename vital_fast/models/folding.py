"""Batch norms folded into the convolutions before them, for an optimization step (``Settings.fold_batchnorm``).

An eval-mode ``BatchNorm`` is an affine map per channel, ``y = (x − μ) s + β`` with ``s = γ / √(σ² + ε)``. When
its input is a convolution's output and nothing else reads that output, the convolution with weights ``W s``
and bias ``(b − μ) s + β`` gives ``y`` directly, and the batch norm can pass its input through. The step's
forward and backward then skip one elementwise pass per batch norm, in and out. On efficientnet-lite0 (49 batch
norms; B = 8, one thread of an AMD EPYC) the network's forward took 0.57-0.76x and its backward 0.63-0.78x as long
(``python -m benchmarks.bench_fold``), the fast preset's channel step alone 0.88-0.92x (``python -m
benchmarks.bench_recipe_step --vital "nofold:fold_batchnorm='off'"``: the loss, the views and the update stay).
The values are the same up to rounding.

The pairs are found, not assumed: :class:`BatchNormFold` runs the network once on the first element of the first
step's input with hooks, and a batch norm is folded when its input is the very tensor its convolution returned
(each called once). The folded network is then checked against the unfolded one on that input (every output
tensor, to ``1e-3`` of its largest value in float32; ``3e-2`` in half precision and with CUDA's TF32
convolutions); a network that fails, or has no pair, runs as it is. A pair is left unfolded in a step that taps
its convolution, or a module that holds the convolution but not its batch norm (their output would change).

The folded weights are set on the convolutions (other ``Parameter`` objects, so that the backward after the
block reads the ones its graph saved) only for the duration of :meth:`BatchNormFold.applied`, and everything
is given back on exit, an error or an interrupt included: what the user holds is as it was, and relevance,
references and objectives with hooks of their own (BatchNorm statistics) see the network as it is. The engine
does not fold under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized
from torch.utils._pytree import tree_leaves

__all__ = ["FOLD_CHOICES", "BatchNormFold", "resolve_fold"]

FOLD_CHOICES = ("auto", "off")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def resolve_fold(value: Optional[str]) -> bool:
    """Whether ``Settings.fold_batchnorm = value`` folds. ``ValueError`` for an unknown value (listing the valid)."""
    value = "auto" if value is None else value
    if value not in FOLD_CHOICES:
        raise ValueError(f"unknown fold_batchnorm {value!r}; valid: {', '.join(FOLD_CHOICES)}")
    return value == "auto"


def _identity(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def _foldable_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None)


def _prefixes(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


class _Pair:
    __slots__ = ("conv", "bn", "weight", "bias", "guards")

    def __init__(self, conv: nn.Module, bn: nn.Module, conv_name: str, bn_name: str) -> None:
        self.conv, self.bn = conv, bn
        with torch.no_grad():  # in float64 on the CPU (MPS has no float64), then in the weight's device and dtype
            def f64(t: torch.Tensor) -> torch.Tensor:
                return t.detach().to("cpu", torch.float64)

            s = f64(bn.running_var).add(bn.eps).rsqrt()
            if bn.weight is not None:
                s = s * f64(bn.weight)
            shift = -f64(bn.running_mean) * s
            if bn.bias is not None:
                shift = shift + f64(bn.bias)
            w = conv.weight
            fmt = torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) \
                and not w.is_contiguous() else torch.contiguous_format
            folded = (f64(w) * s.view(-1, *([1] * (w.dim() - 1)))).to(w.device, w.dtype).contiguous(memory_format=fmt)
            b = shift if conv.bias is None else f64(conv.bias) * s + shift
            self.weight = nn.Parameter(folded, requires_grad=False)
            self.bias = nn.Parameter(b.to(w.device, w.dtype), requires_grad=False)
        # a tap on one of these modules reads the convolution's own output, which folding changes
        self.guards = set(_prefixes(conv_name)) - set(_prefixes(bn_name))


class BatchNormFold:
    """The batch norms of ``model`` that can be folded into their convolutions; :meth:`applied` folds them.

    Built lazily: the first :meth:`applied` call finds and checks the pairs on its input (two forward passes
    without gradients); later calls only swap tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pairs: Optional[List[_Pair]] = None  # None: not probed yet; []: nothing to fold

    @torch.no_grad()
    def _probe(self, x: torch.Tensor) -> List[_Pair]:
        model = self.model
        names = {m: n for n, m in model.named_modules()}
        if model.training or not any(_foldable_bn(m) for m in names):
            return []
        calls: Dict[nn.Module, int] = {}
        last: List[Tuple[nn.Module, torch.Tensor]] = []
        found: Dict[nn.Module, nn.Module] = {}

        def conv_hook(m, args, out):
            calls[m] = calls.get(m, 0) + 1
            last[:] = [(m, out)]

        def bn_hook(m, args):
            calls[m] = calls.get(m, 0) + 1
            if last and args and args[0] is last[0][1]:
                found[m] = last[0][0]

        handles = []
        try:
            for m in names:
                if (isinstance(m, _CONVS) and isinstance(m._parameters.get("weight"), nn.Parameter)
                        and not is_parametrized(m)):  # a weight computed from others is not ours to set
                    handles.append(m.register_forward_hook(conv_hook))
                elif _foldable_bn(m):
                    handles.append(m.register_forward_pre_hook(bn_hook))
            ref = model(x)
        except Exception:  # a network that does not run on its own (the step's pass will say why): no folding
            return []
        finally:
            for h in handles:
                h.remove()
        pairs = [_Pair(conv, bn, names[conv], names[bn]) for bn, conv in found.items()
                 if calls.get(bn) == 1 and calls.get(conv) == 1 and conv.weight.shape[0] == bn.num_features]
        if not pairs:
            return []
        try:
            with self._swapped(pairs):
                out = model(x)
        except Exception:
            return []
        a, b = tree_leaves(ref), tree_leaves(out)
        if len(a) != len(b) or not any(isinstance(u, torch.Tensor) and u.is_floating_point() for u in a):
            return []  # nothing to check the folded network by: it runs as it is
        # float32 to 1e-3; half precision and TF32 convolutions (CUDA's default) to 3e-2: a wrong pair is off by O(1)
        tf32 = x.is_cuda and torch.backends.cudnn.allow_tf32
        tol = 1e-3 if x.dtype == torch.float32 and not tf32 else 3e-2
        for u, v in zip(a, b):
            if isinstance(u, torch.Tensor) and u.is_floating_point():
                scale = float(u.detach().abs().max()) if u.numel() else 0.0
                if (u.shape != v.shape or not torch.isfinite(v).all()
                        or float((u - v).abs().max()) > tol * max(scale, 1e-6)):
                    return []
        return pairs

    @contextlib.contextmanager
    def _swapped(self, pairs: Sequence[_Pair]) -> Iterator[None]:
        # the modules get other Parameter objects (not other .data): a backward after the block still reads the
        # folded weights its graph saved
        saved = []
        try:
            for p in pairs:
                saved.append((p, p.conv.weight, p.conv.bias))
                p.conv.weight, p.conv.bias = p.weight, p.bias
                p.bn.forward = _identity
            yield
        finally:
            for p, w, b in reversed(saved):
                p.conv.weight, p.conv.bias = w, b
                p.bn.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def applied(self, x: torch.Tensor, layers: Sequence[str] = ()) -> Iterator[int]:
        """Within the block, the network's batch norms folded (but those of pairs guarded by a tap in
        ``layers``); yields how many are folded. ``x``: the step's input, probed at the first call."""
        if self.pairs is None:
            self.pairs = self._probe(x.detach()[:1])  # one element: the pairs do not depend on the batch
        tapped = set(layers)
        pairs = [p for p in self.pairs if not (p.guards & tapped)]
        with self._swapped(pairs):
            yield len(pairs)
