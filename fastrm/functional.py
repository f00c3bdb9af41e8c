"""Functional API: ``fastrm.functional.pairwise_loss`` (see fastrm/losses.py for the formulas)."""

from fastrm.losses import LOSS_KINDS, pairwise_loss

__all__ = ["pairwise_loss", "LOSS_KINDS"]
