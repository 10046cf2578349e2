"""What every merging mixin changes in timm's model API, whatever the family.

A patched model is still the timm model, so the rest of timm's API must either merge as the
forward does or refuse: ``reset_classifier`` changes the head whose cost every GFLOPs figure
includes, ``forward_intermediates`` runs timm's own block loop (which cannot merge), and training
options the block loop does not carry out must not pass silently.
"""

from __future__ import annotations

from torch import nn

from ..flops import ViTCost
from .loop import Merging
from .rerun import RerunForward


class MergingModel(RerunForward):
    """First base of every merging mixin (after it, the model's own class)."""

    _merging: Merging

    def reset_classifier(self, *args, **kwargs) -> None:
        super().reset_classifier(*args, **kwargs)
        self._merging.cost = ViTCost.from_model(self)  # the new head's cost, in every later figure

    def forward_intermediates(self, *args, **kwargs):
        if self._merging.policy.merges:
            raise NotImplementedError(
                "forward_intermediates runs timm's own blocks and cannot merge tokens: call it inside "
                "`with atm_lightning.patch.unmerged(model):` for the dense features, or unpatch the model"
            )
        self._merging.last = None  # its features hold every token: the head pools them as timm does
        return super().forward_intermediates(*args, **kwargs)

    def check_training_options(self) -> None:
        """Refuse, when training, the timm options the merging block loop does not carry out."""
        if not self.training:
            return
        if getattr(self, "grad_checkpointing", False):
            raise NotImplementedError(
                "gradient checkpointing is not carried out while tokens merge: call "
                "model.set_grad_checkpointing(False) (or lower the batch size)"
            )
        if not isinstance(getattr(self, "patch_drop", None), (nn.Identity, type(None))):
            raise NotImplementedError(
                "token merging does not support patch dropout in training: create the model with patch_drop_rate=0"
            )
