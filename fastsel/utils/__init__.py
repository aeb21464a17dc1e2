"""Foundations below everything: atomic file writes and progress bars."""
from fastsel.utils.atomic import *  # noqa: F401,F403
from fastsel.utils.progress import *  # noqa: F401,F403
