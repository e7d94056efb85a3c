"""sarcube's error types. Every error a user can cause by bad input derives from SarcubeError and
carries a message that names the file/parameter and what was expected; the CLI prints it as one
line (no traceback) and exits with status 2."""

from __future__ import annotations


class SarcubeError(Exception):
    """Base class for errors caused by bad input or configuration."""


class InputError(SarcubeError, ValueError):
    """An argument, file or URL that is not what was expected."""


class StorageError(SarcubeError):
    """A URL that cannot be read or written: a missing bucket or object, no permission, no
    credentials, an endpoint that cannot be reached. The message names the URL."""
