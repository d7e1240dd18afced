"""Tiny randomly initialised models in the real checkpoint format, for fast tests.

:func:`make_tiny_models` lives in ``benchmarks/tiny_models.py``, which the batch benchmark uses as well (the
tests may import the benchmarks' code, never the other way round).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCHMARKS not in sys.path:
    sys.path.append(_BENCHMARKS)

from tiny_models import make_tiny_models  # noqa: E402,F401 - re-exported


def calibrated_repvgg(seed: int = 0, batches=None) -> torch.nn.Module:
    """RepVGG-A0 (eval mode) with non-trivial BatchNorm statistics and a re-drawn head.

    A freshly initialised RepVGG gives nearly the same output for every input and
    its BatchNorms are identities; calibrating the statistics on ``batches``
    (default: two batches of random 64 px images) makes both matter.
    """
    from cervscan.models.networks import build_classifier

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = build_classifier("repvgg_a0")
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
            mod.momentum = None  # cumulative average over the calibration batches
    if batches is None:
        batches = [torch.rand(4, 3, 64, 64, generator=g) for _ in range(2)]
    m.train()
    with torch.no_grad():
        for x in batches:
            m(x)
    torch.nn.init.normal_(m.head.fc.weight, std=0.05, generator=g)
    return m.eval()
