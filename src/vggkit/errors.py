"""The one exception family for errors a user can cause.

The CLI prints ``str(error)`` as a single line and exits with ``error.exit_code``
(2 for usage errors, 1 for everything else); tracebacks only with ``--debug``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VggkitError(Exception):
    """An error the user can fix; the message names the file or flag at fault."""

    exit_code = 1


class UsageError(VggkitError):
    """A bad flag, name or value on the command line or in a config file."""

    exit_code = 2


class DataError(VggkitError):
    """A dataset file that is missing, truncated, corrupt or inconsistent."""


class CheckpointError(VggkitError):
    """A checkpoint or run folder that cannot be used as asked."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(kind: str, word: str, choices: Iterable[str]) -> UsageError:
    """A UsageError for an unknown model/dataset/head/recipe name."""
    choices = sorted(choices)
    return UsageError(
        f"unknown {kind} {word!r}{did_you_mean(word, choices)}; choose from: {', '.join(choices)}"
    )
