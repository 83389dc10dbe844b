"""Errors that carry one clear sentence for the user."""


class NumbaemError(ValueError):
    """Bad input or an impossible request; the message names the problem and the fix.

    The command line prints the message alone (no traceback) and exits non-zero.
    """

    exit_code = 2


class InterruptedRun(RuntimeError):
    """A run stopped by SIGINT or SIGTERM at a safe point, after writing its checkpoint."""

    exit_code = 130
