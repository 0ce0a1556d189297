"""CAML's ramp-up: known values, the official quantised schedule and the released log's first step."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_ext.caml.losses import caml_total_loss
from nnunet_ext.caml.ramps import caml_rampup, sigmoid_rampup


@pytest.mark.parametrize("x, length, expected", [
    (0, 100, math.exp(-5)),
    (25, 100, 0.0601),
    (50, 100, 0.2865),
    (75, 100, 0.7316),
    (100, 100, 1.0),
    (250, 100, 1.0),
    (0, 0, 1.0),
    (7, 0, 1.0),
])
def test_sigmoid_rampup_known_values(x, length, expected):
    assert sigmoid_rampup(x, length) == pytest.approx(expected, abs=1e-4)


def test_sigmoid_rampup_is_monotone():
    values = [sigmoid_rampup(x, 40) for x in range(0, 60)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_default_ramp_is_per_step_and_zero_based():
    assert caml_rampup(0, 1000) == pytest.approx(math.exp(-5))
    assert caml_rampup(999, 1000) < 1.0
    assert caml_rampup(1000, 1000) == 1.0


def test_quantised_ramp_reproduces_official_schedule():
    # official: 6000 iterations = R = 40 quanta of 150; steps 1..149 (t = 0..148) give e^-5
    assert all(caml_rampup(t, 6000, 150) == pytest.approx(math.exp(-5)) for t in (0, 1, 100, 148))
    assert caml_rampup(149, 6000, 150) == pytest.approx(math.exp(-5 * (1 - 1 / 40) ** 2))
    assert caml_rampup(5998, 6000, 150) < 1.0
    assert caml_rampup(5999, 6000, 150) == 1.0  # 1-based step 6000
    assert caml_rampup(14999, 6000, 150) == 1.0


def test_released_log_first_and_last_iteration_totals():
    # LA, 4 labels: logged components and totals of iterations 1 and 15,000 (loss_s is already sup_v + sup_a)
    first = caml_total_loss(torch.tensor(1.586921), torch.tensor(0.427246), torch.tensor(13.700855),
                            caml_rampup(0, 6000, 150))
    assert float(first) == pytest.approx(0.800955, abs=2e-6)
    last = caml_total_loss(torch.tensor(0.036419), torch.tensor(0.009124), torch.tensor(0.729586),
                           caml_rampup(14999, 6000, 150))
    assert float(last) == pytest.approx(0.063813, abs=2e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: sigmoid_rampup(1, -1), "length"),
    (lambda: caml_rampup(-1, 10), "step"),
    (lambda: caml_rampup(1, 10, 0), "quantum"),
    (lambda: caml_total_loss(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), 1.5), "ramp"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
