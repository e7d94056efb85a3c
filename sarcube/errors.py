"""sarcube's error types. Every error a user can cause by bad input derives from SarcubeError and
carries a message that names the file/parameter and what was expected; every entry point prints
it as one line (no traceback) and exits with status 2, through ``run_command``."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Mapping, Sequence


class SarcubeError(Exception):
    """Base class for errors caused by bad input or configuration."""


class InputError(SarcubeError, ValueError):
    """An argument, file or URL that is not what was expected."""


class StorageError(SarcubeError):
    """A URL that cannot be read or written: a missing bucket or object, no permission, no
    credentials, an endpoint that cannot be reached. The message names the URL."""


def report_error(
    prefix: str, e: BaseException, verbose: bool = False, message: str | None = None
) -> None:
    """``{prefix}: error: {message or e}`` on stderr (after the traceback with ``verbose``)."""
    if verbose:
        traceback.print_exception(e)
    print(f"{prefix}: error: {message or e}", file=sys.stderr)


def run_command(
    work: Callable[[], int],
    prefix: str,
    verbose: bool = False,
    *,
    bad_input: tuple[type[BaseException], ...] = (),
    statuses: Mapping[type[BaseException], int] | None = None,
    describe: Sequence[Callable[[BaseException], str | None]] = (),
) -> int:
    """Run a command's work and turn every failure a user can act on into one line.

    The one error → exit-status policy of every entry point (``sarcube``, ``python -m
    training.pretrain`` / ``finetune`` / ``predict``, ``sarcube evaluate``):

    - ``SarcubeError`` and the ``bad_input`` types: ``{prefix}: error: {e}``, status 2;
    - a type in ``statuses`` (e.g. a non-finite loss → 3): the same line, that status;
    - any other exception that one of ``describe`` names (a storage failure, a peer rank that
      stopped): that message, status 2; anything else propagates (a bug: its traceback);
    - Ctrl-C: ``{prefix}: interrupted``, status 130.

    ``verbose`` prints the traceback before the line. Returns ``work()``'s status otherwise.
    """
    try:
        return work()
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, (SarcubeError, *bad_input)):
            report_error(prefix, e, verbose)
            return 2
        for kind, status in (statuses or {}).items():
            if isinstance(e, kind):
                report_error(prefix, e, verbose)
                return status
        for describer in describe:
            message = describer(e)
            if message is not None:
                report_error(prefix, e, verbose, message)
                return 2
        raise
