"""One-element CPU batches, padded to two so that every convolution takes the same path.

PyTorch chooses a CPU convolution backend per call (``ConvParams::use_mkldnn`` in
``aten/src/ATen/native/Convolution.cpp``). A float32 convolution whose batch has **one** element,
no groups, a kernel not larger than 3x3 and an input of at most 20480 values (the pointwise
convolutions of late EfficientNet blocks, the stem at small sizes, the 3x3 convolutions of late
ResNet stages at small sizes) goes to the native ``_slow_conv2d`` path instead of oneDNN. Its
GEMMs are MKL ``sgemm`` calls on all threads, whose summation order depends on how MKL splits the
work over threads: measured on an Intel Xeon (AVX-512), the input gradient of efficientnet-lite0
at batch 1 differs bit-wise at 2, 3 and 4 threads, and a 150-step visualization at 2 against 3
threads differs by up to 253/255; reported from other x86 machines, it differs run to run at one
thread count, while ``OMP_NUM_THREADS=1`` or two-element batches gave identical images. With two
or more elements every convolution goes to oneDNN, whose result for an element is the same at 2,
3 and 4 threads and whatever the other elements of the batch (measured for batches of 2 to 6).

So a one-element CPU batch runs as two elements (the second a detached copy of the first) and
the outputs are sliced back: a single target's image is then the image it gets in a two-target
batch (the same shapes, hence the same oneDNN algorithms, on any CPU), and does not depend on
MKL's thread schedule. The price is a second forward/backward of the network for single-element
calls only (1.5-1.9x their time on 1 and 2 threads).

In the engine's step the copy is made only where it is needed
(:func:`vital_fast.models.padding.needs_padding`): a probe forward at
batch 1 of the step's own (partial) pass, once per model, input shape, dtype, layout, precision, tapped layers
and whether more than one thread runs, asks PyTorch which backend each convolution takes
(``torch._C._select_conv_backend``), and pads when one of them is not oneDNN or when a matrix product runs
(a linear layer, attention: they round differently at another batch size, and a ViT's channel target alone
and in a batch of two drifted 0.019 apart). ResNet-50 up to layer3 at 224 px takes oneDNN everywhere at batch 1,
so a single target there no longer pays a second forward/backward (``python -m benchmarks.bench_lucent
--padded`` times both); efficientnet-lite0 (its late pointwise convolutions) and small inputs still pad.
What the unpadded batch-1 oneDNN path does not keep is the invariance to the *number* of threads (its
gradients differ by rounding at 2 and 3 threads, which an optimization amplifies into another image),
which padded batches have; run-to-run determinism at a given thread count holds either way
(tests/test_gpu_step.py checks a run repeated).

With one thread, PyTorch keeps the 1x1 convolutions of batches under 16 elements on the native
path whatever the padding; single-threaded MKL is deterministic, but rounds differently from
oneDNN, so ``OMP_NUM_THREADS=1`` gives other (equally good) images than two or more threads.
"""

from __future__ import annotations

from typing import Dict, TypeVar

import torch

K = TypeVar("K")

MIN_CPU_BATCH = 2


def pad_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a detached copy of its element appended when it is a one-element CPU batch; else ``x``.

    The copy carries no gradient back to ``x``; slice what the network returns with
    :func:`unpad` (or ``[:1]``).
    """
    if x.device.type != "cpu" or x.dim() == 0 or x.shape[0] != 1:
        return x
    return torch.cat([x, x.detach().expand(MIN_CPU_BATCH - 1, *x.shape[1:])])


def unpad(outputs: Dict[K, torch.Tensor], n: int, padded: int) -> Dict[K, torch.Tensor]:
    """The first ``n`` elements (dim 0) of every tensor of ``outputs`` that holds ``padded`` ones."""
    if padded == n:
        return dict(outputs)
    return {k: (v[:n] if v.dim() and v.shape[0] == padded else v) for k, v in outputs.items()}
