"""One error hierarchy: every failure a user can cause carries an exit code and a one-line message.

The CLI prints ``imgkit: <message>`` and exits with ``exit_code``; anything that is not an
ImgkitError is a bug and exits with INTERNAL (a traceback only with --debug).

Exit codes (documented in the README):
  0 success, 1 generic failure / negative answer (compare: different; validate: findings),
  2 usage error from the command line parser,
  64 bad option value, 65 invalid or corrupt image, 66 input missing or unreadable,
  67 format or feature not supported, 68 refused for safety (backing file, external file,
  ambiguous format), 73 output exists or cannot be created, 74 I/O error while writing (disk
  full, file too large), 75 verification failed, 70 internal error, 130 interrupted (SIGINT),
  143 terminated (SIGTERM).
``compare`` and ``check`` keep qemu-img's own codes (see cli.py).
"""
from __future__ import annotations


class ImgkitError(Exception):
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ImgkitError):
    exit_code = 64


class InvalidImage(ImgkitError):
    """The file is not a valid image of the format it claims (corrupt, truncated, out of bounds)."""
    exit_code = 65


class LimitExceeded(InvalidImage):
    """A header declares a size beyond what limits.py allows."""


class InputError(ImgkitError):
    exit_code = 66


class UnsupportedFormat(ImgkitError):
    exit_code = 67


class NoConsistencyChecks(UnsupportedFormat):
    """The format has no metadata to check (raw); `check` answers 63 as qemu-img does."""


class UnsafeImage(ImgkitError):
    """The image would make us read another file, or its format is ambiguous."""
    exit_code = 68


class OutputError(ImgkitError):
    exit_code = 73


class WriteError(ImgkitError):
    exit_code = 74


class VerifyError(ImgkitError):
    exit_code = 75


class Interrupted(ImgkitError):
    exit_code = 130

    def __init__(self, message: str = "interrupted", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


INTERNAL_ERROR_EXIT = 70
