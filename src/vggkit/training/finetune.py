"""Fine-tuning controls, as Keras and fastai teach them: the convolutional features frozen for
the whole run (``--freeze-features``, Keras's ``layer.trainable = False``), or for the first
epochs only (``--freeze-epochs N``, fastai's ``fine_tune(epochs, freeze_epochs=N)``). The
features' own learning rate (``--features-lr-scale``, fastai's discriminative rates) is a
parameter-group factor, set in :func:`vggkit.training.optim.parameter_groups`.

Frozen features: ``requires_grad`` is off on every one of their parameters, so autograd
records nothing through them (their output has no ``grad_fn``; their backward never runs,
and the engine's FastConv2d takes the stock convolution for a weight that needs no
gradient). Their normalisation layers stay in eval mode whenever the network is put in
train mode, as Keras runs a non-trainable BatchNorm in inference mode: their running
statistics stay as they are.

The optimizer holds every parameter from the start: a frozen one has no gradient, so SGD and
Adam skip it (no weight decay, no momentum; its momentum starts at the unfreeze) and the
optimizer state's layout is the same on both sides of the unfreeze. Frozen-or-not is a pure
function of the epoch (:func:`features_frozen`), so a resume lands in the same state.
"""

from __future__ import annotations

import functools

from torch import nn

from vggkit.config import TrainConfig
from vggkit.errors import UsageError
from vggkit.training.distributed import DistInfo


def features_frozen(config: TrainConfig, epoch: int) -> bool:
    """Whether ``config`` trains epoch ``epoch`` (0-based) with the features frozen."""
    return config.freeze_features or epoch < config.freeze_epochs


class _NormsStayInEval:
    """Mixed into the features' class while they are frozen: ``train()`` leaves their
    normalisation layers in eval mode (their running statistics are not updated)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.train(False)
        return self


@functools.cache
def _frozen_class(cls: type) -> type:
    return type(f"Frozen{cls.__name__}", (_NormsStayInEval, cls), {})


class FeatureFreeze:
    """Freezes and unfreezes ``model.features``; ``always``: for good, else for the first
    ``epochs`` epochs (:meth:`apply` each epoch). Parameters that were frozen by design
    before (a whitening stem's weight, say) stay frozen after an unfreeze."""

    def __init__(self, model: nn.Module, *, always: bool = False, epochs: int = 0) -> None:
        self.features: nn.Module = model.features
        self.always, self.epochs = always, epochs
        self.base_class = type(self.features)
        self.trainable = [p for p in self.features.parameters() if p.requires_grad]
        self.frozen = False
        if always:  # now, before DistributedDataParallel wraps the model and leaves them out
            self.set_frozen(True)

    @staticmethod
    def from_config(model: nn.Module, config: TrainConfig, dist: DistInfo | None = None
                    ) -> FeatureFreeze:
        if config.freeze_epochs and dist is not None and dist.enabled:
            raise UsageError(
                "--freeze-epochs unfreezes the features mid-run, which DistributedDataParallel "
                "does not allow (it fixes the parameters it synchronises when it wraps the "
                "model); train in one process, or use --freeze-features under torchrun")
        return FeatureFreeze(model, always=config.freeze_features, epochs=config.freeze_epochs)

    def apply(self, epoch: int) -> bool:
        """Freeze or unfreeze for ``epoch`` (0-based); True while frozen. Call it after the
        network was put in train mode (it also works before: the mode follows the class)."""
        self.set_frozen(self.always or epoch < self.epochs)
        return self.frozen

    def set_frozen(self, frozen: bool) -> None:
        if frozen == self.frozen:
            return
        for param in self.trainable:
            param.requires_grad_(not frozen)
        # A class swap, as the engine's FastConv2d: parameters, hooks and state-dict keys
        # are unchanged; only train() differs.
        self.features.__class__ = _frozen_class(self.base_class) if frozen else self.base_class
        self.features.train(self.features.training)
        self.frozen = frozen


def freeze_features(model: nn.Module) -> FeatureFreeze:
    """Freeze ``model.features`` for good, as ``--freeze-features`` does."""
    return FeatureFreeze(model, always=True)
