"""Errors that carry one clear sentence for the user."""


class NumbaemError(ValueError):
    """Bad input or an impossible request; the message names the problem and the fix.

    The command line prints the message alone (no traceback) and exits non-zero.
    """

    exit_code = 2


class OutputExists(NumbaemError):
    """An output file exists and overwriting was not allowed.

    The message names the library's switch (``force=True``); the command line words it
    as its own option (``--force``) from :attr:`path`.
    """

    def __init__(self, path):
        self.path = str(path)
        super().__init__(f"output {self.path!r} exists; pass force=True to overwrite it, or choose another name")

    def cli_message(self):
        return f"output {self.path!r} exists; pass --force to overwrite it, or choose another name"


class InterruptedRun(RuntimeError):
    """A run stopped by SIGINT or SIGTERM at a safe point, after writing its checkpoint."""

    exit_code = 130
