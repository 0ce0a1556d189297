"""``nnunet_ext.training.budget.set_budget``: the budget every test and benchmark trainer variant sets."""
from types import SimpleNamespace

import pytest

from nnunet_ext.training.budget import set_budget


def _trainer():
    # nnU-Net's defaults (nnUNetTrainer.__init__)
    return SimpleNamespace(num_epochs=1000, num_iterations_per_epoch=250, num_val_iterations_per_epoch=50,
                           save_every=50)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(epochs=2, iterations=3), (2, 3, 50, 50)),
    (dict(epochs=2, iterations=3, val_iterations=1), (2, 3, 1, 50)),
    (dict(epochs=4, iterations=1, val_iterations=2, save_every=1), (4, 1, 2, 1)),
])
def test_sets_only_the_given_values(kwargs, expected):
    trainer = _trainer()
    set_budget(trainer, **kwargs)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
            trainer.save_every) == expected


@pytest.mark.parametrize("kwargs, attribute", [
    (dict(epochs=0, iterations=3), "num_epochs"),
    (dict(epochs=2, iterations=-1), "num_iterations_per_epoch"),
    (dict(epochs=2, iterations=3, val_iterations=0), "num_val_iterations_per_epoch"),
    (dict(epochs=2, iterations=3, save_every=2.5), "save_every"),
    (dict(epochs=True, iterations=3), "num_epochs"),
])
def test_bad_values_are_refused_before_anything_changes(kwargs, attribute):
    trainer = _trainer()
    with pytest.raises(ValueError, match=attribute):
        set_budget(trainer, **kwargs)
    assert trainer.num_epochs == 1000
