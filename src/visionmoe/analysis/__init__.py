"""Routing and model analysis."""

from .gradients import gradient_magnitude_scores

__all__ = ["gradient_magnitude_scores"]
