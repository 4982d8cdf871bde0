"""User-facing errors: each names the bad value and what would be valid.

The CLI turns any `MAEError` into one line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""

import difflib
from collections.abc import Iterable, Sequence


class MAEError(Exception):
    """Base class of errors caused by the user's input (config, data, checkpoint), not by a bug."""


class ConfigError(MAEError, ValueError):
    """An unknown key, a wrong type or an impossible value in a config."""


class ResumeConflictError(ConfigError):
    """A resume whose settings would change what the run computes; `changes` lists them as "key old -> new"."""

    def __init__(self, message: str, changes: str) -> None:
        super().__init__(message)
        self.changes = changes


class DataError(MAEError):
    """A missing, empty or unreadable dataset."""


class CheckpointError(MAEError):
    """A checkpoint that is missing, truncated, unsafe or of another architecture."""


class WeightsError(MAEError):
    """Released weights that cannot be had by name: an unknown name, a failed or corrupt download, offline and not
    cached (`mae.weights`)."""


class OutputError(MAEError):
    """A file that could not be written: a full disk, a read-only folder, missing permissions."""


class TrainingError(MAEError):
    """A run that cannot go on (e.g. repeated non-finite losses)."""


class InputError(MAEError, ValueError):
    """A tensor or argument of the wrong shape or range passed to the library's API."""


def first_line(e: BaseException, skip: tuple[str, ...] = ()) -> str:
    """The first line of an exception's message that does not start with one of `skip` (the generic advice a library
    wraps around the reason), stripped; "" for an empty message. What messages quote of an error they wrap."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(skip)), lines[0] if lines else "")


def excerpt(names: Sequence[str], n: int = 4) -> str:
    """'a, b, c, d (+N more)': the first `n` of a long list of names (keys, files) for a one-line message."""
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def unknown_choice(what: str, name: str, valid: Iterable[str]) -> ConfigError:
    """The error for a name no registry holds (a target, a mask strategy, a position table): the valid names, and
    the closest one as a suggestion."""
    names = sorted(valid)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown {what} '{name}' (valid: {', '.join(names)}){hint}")


class Interrupted(MAEError):
    """A run stopped by a signal (SIGTERM, SIGUSR1, SIGINT) after writing a checkpoint; it resumes with
    ``--resume auto``. The CLI exits with `exit_code` (128 + the signal number)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
