"""Training precision: bf16 autocast with channels_last where the CPU has bf16 units, else fp32.

bf16 here means mixed precision: master weights, optimizer state and the loss stay fp32; convs
and matmuls run in bf16 under ``torch.autocast``, on channels_last tensors (the layout oneDNN's
bf16 kernels want; without it autocast alone gains little, measured in bench/README.md).
Exports and every evaluation stay fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(precision: str) -> str:
    """The precision a stage will actually train in: ``bf16`` falls back to fp32, with a log line."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not cpu_has_bf16():
        logger.warning("precision = 'bf16' asked for, but this CPU has no bf16 kernels "
                       "(no AVX512-BF16 or AMX): training in fp32")
        return "fp32"
    return precision


def prepare(module: nn.Module, precision: str) -> None:
    """Lay ``module``'s weights out for ``precision`` (channels_last for bf16) in place."""
    module.to(memory_format=torch.channels_last if precision == "bf16" else torch.contiguous_format)


def layout(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A 4-D batch in the layout ``precision`` computes fastest in."""
    if precision == "bf16" and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def autocast(precision: str) -> Iterator[None]:
    """bf16 autocast on the CPU for ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield
