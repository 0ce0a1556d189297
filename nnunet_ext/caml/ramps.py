"""Ramp-up of CAML's unsupervised loss weights.

CAML (Gao et al., MICCAI 2023) multiplies both unsupervised weights by the sigmoid-shaped ramp of Laine & Aila
("Temporal Ensembling", ICLR 2017, arXiv:1610.02242): ``r(x) = exp(-5 (1 - x / L)^2)`` for ``0 <= x <= L``.
The official code evaluates it at ``x = floor(k / 150)`` (``k`` the 1-based iteration) with the length ``L`` given
in units of 150 iterations; nnU-Net counts 0-based steps, so the default here ramps per step.
"""
from __future__ import annotations

import math


def sigmoid_rampup(x: float, length: float) -> float:
    """``exp(-5 (1 - clip(x / length, 0, 1))^2)``; 1 when ``length == 0``.

    Args:
        x: position on the ramp (any non-negative number; values beyond ``length`` give 1).
        length: ramp length in the same unit as ``x``.

    Raises:
        ValueError: for a negative ``length``.
    """
    if length < 0:
        raise ValueError(f"ramp length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(x / length, 0.0), 1.0)
    return float(math.exp(-5.0 * phase * phase))


def caml_rampup(step: int, length_iterations: float, quantum: int = 1) -> float:
    """CAML's ramp at a 0-based training step.

    ``quantum == 1`` (default): ``sigmoid_rampup(step, length_iterations)``, so ``r = e^-5`` at the first step and
    1 from ``step = length_iterations`` on. ``quantum > 1`` reproduces the official schedule: the ramp advances every
    ``quantum`` iterations, ``x = floor((step + 1) / quantum)`` with length ``length_iterations / quantum`` (official:
    quantum 150, lengths 40 / 20 / 15 quanta = 6000 / 3000 / 2250 iterations).

    Raises:
        ValueError: for a negative step or length, or a quantum below 1.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if quantum < 1:
        raise ValueError(f"ramp quantum must be >= 1, got {quantum}")
    if quantum == 1:
        return sigmoid_rampup(step, length_iterations)
    return sigmoid_rampup((step + 1) // quantum, length_iterations / quantum)
