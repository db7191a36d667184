"""The one exception type for user errors, and how a command reports it."""

import sys
from collections.abc import Callable

__all__ = ["SpectraError", "one_line", "run_command"]


class SpectraError(ValueError):
    """Bad input from the user: the message says what was expected and what was given."""


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (whitespace, newlines included, collapsed)."""
    return " ".join(str(exc).split())


def run_command(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command-line `main(argv)` and return its exit status.

    A SpectraError, or an operating-system error the user can fix (a full disk, a file-size limit,
    permissions, a read-only file system: `io.USER_ERRNOS`), prints one line, `error: ...`, and
    gives 2; Ctrl-C prints one line and gives
    130 (128 + SIGINT, what a shell reports for an interrupted program). Anything else is a bug
    and keeps its traceback.
    """
    try:
        return main(argv) or 0
    except SpectraError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        # a full disk, a quota, permissions: the user's to fix
        from spectra_lens.io import USER_ERRNOS

        if e.errno not in USER_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or one_line(e)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
