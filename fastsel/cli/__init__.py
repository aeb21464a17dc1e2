"""The command line: ``fastsel score | plan | finetune | info``."""
from fastsel.cli.app import main  # noqa: F401

__all__ = ["main"]
