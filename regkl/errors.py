"""Error hierarchy. The CLI turns these into one-line messages and exit codes."""


class RegklError(Exception):
    """Base class of every error regkl raises on purpose.

    Attributes
    ----------
    exit_code : int
        Process exit code the command-line interface uses for this error.
    """

    exit_code = 2

    def __init__(self, message, *, path=None):
        self.path = None if path is None else str(path)
        self.problem = str(message)
        super().__init__(f"{self.path}: {message}" if self.path else str(message))


class InputError(RegklError):
    """A bad input: missing or unreadable file, not an image, wrong shape, invalid header..."""


class OutputError(RegklError):
    """An output cannot be written (unwritable folder, would overwrite an input...)."""


class KernelInputError(RegklError, ValueError):
    """Arrays handed to a numerical kernel have the wrong shape, dtype or values."""


class RegistrationError(RegklError):
    """The registration itself failed (no overlap, optimiser produced non-finite values...)."""

    exit_code = 1
