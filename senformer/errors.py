"""Errors in what the user gave us (a flag value, a file, a dataset), as opposed to bugs.

The command-line tools print these as one line naming the argument or file and exit with status 2;
``--debug`` shows the traceback. They subclass ValueError so callers that catch ValueError keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Base class: the message alone tells the user what to fix."""


class ConfigError(UserError):
    """A configuration key or command-line value that is unknown, of the wrong type or out of range."""


class CheckpointError(UserError):
    """A checkpoint file that is missing a part, truncated or otherwise unreadable."""


class DataError(UserError):
    """A dataset file that cannot be used: unreadable, wrong size, or labels outside the classes."""
