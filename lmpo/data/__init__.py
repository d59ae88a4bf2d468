"""Prompt, SFT and preference datasets, chat templates, and the built-in tasks."""

from .datasets import DatasetError, load_rows, render_prompt
from .tasks import ADDITION, addition_heldout, addition_rows

__all__ = ["DatasetError", "load_rows", "render_prompt", "ADDITION", "addition_heldout", "addition_rows"]
