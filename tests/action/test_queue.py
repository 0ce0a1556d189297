"""RingQueue: FIFO order with wrap-around for any push sizes, labels, state dict, bad options."""
from __future__ import annotations

import pytest
import torch

from nnunet_ext.action.queue import RingQueue


@pytest.mark.parametrize("pushes", [[1, 1, 1], [3, 4, 5, 2], [7], [12], [5, 9, 1, 10]])
def test_get_returns_the_last_rows_in_fifo_order(pushes):
    queue = RingQueue(6, 2, init="zeros")
    history = []
    counter = 0
    for n in pushes:
        rows = torch.arange(counter, counter + n, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
        counter += n
        queue.push(rows)
        history.extend(rows[:, 0].tolist())
    expected = ([0.0] * 6 + history)[-6:]
    assert queue.get()[:, 0].tolist() == expected


def test_random_init_is_unit_norm_and_get_is_a_copy():
    torch.manual_seed(0)
    queue = RingQueue(5, 3)
    assert torch.allclose(queue.items.norm(dim=1), torch.ones(5))
    snapshot = queue.get()
    queue.push(torch.zeros(2, 3))
    assert not torch.equal(snapshot, queue.get())
    assert snapshot.norm(dim=1).min() > 0.99


def test_label_queue_and_state_dict_round_trip():
    labels = RingQueue(4, (), init="fill", dtype=torch.long, fill_value=-1)
    assert labels.get().tolist() == [-1, -1, -1, -1]
    labels.push(torch.tensor([3, 1, 2]))
    copy = RingQueue(4, (), init="fill", dtype=torch.long, fill_value=-1)
    copy.load_state_dict(labels.state_dict())
    assert copy.get().tolist() == [-1, 3, 1, 2] and int(copy.pointer) == 3


def test_pushed_rows_are_detached():
    queue = RingQueue(3, 2, init="zeros")
    rows = torch.ones(2, 2, requires_grad=True) * 2
    queue.push(rows)
    assert not queue.items.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0, "item_shape": 2}, "positive integer"),
    ({"size": 3, "item_shape": 2, "init": "uniform"}, "unknown queue init"),
    ({"size": 3, "item_shape": (2, 2)}, "1-D items"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RingQueue(**kwargs)


def test_wrong_row_shape():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        RingQueue(3, 2).push(torch.zeros(2, 3))
