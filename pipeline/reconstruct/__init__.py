"""Whole-scan reconstruction, evaluation metrics and reports."""

from .metrics import nmse, psnr

__all__ = ["psnr", "nmse"]
