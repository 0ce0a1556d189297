"""The split of a planned batch between labeled and unlabeled patches (``split_planned_batch``)."""
from __future__ import annotations

import pytest

from nnunet_ext.training.semi_supervised import split_planned_batch_size


@pytest.mark.parametrize("planned, expected", [(2, (1, 1)), (4, (2, 2)), (5, (3, 2)), (6, (3, 3)), (12, (6, 6))])
def test_labeled_and_unlabeled_make_the_planned_batch(planned, expected):
    labeled, unlabeled = split_planned_batch_size(planned)
    assert (labeled, unlabeled) == expected and labeled + unlabeled == planned


@pytest.mark.parametrize("planned", [0, 1])
def test_a_batch_too_small_to_split_is_refused(planned):
    with pytest.raises(ValueError, match=f"at least 2.*give {planned} per process"):
        split_planned_batch_size(planned)
