"""The errors that are the user's to fix, and how every command line reports them.

A `UserError` (a bad config, a missing or corrupt file, an unusable checkpoint) is printed as one
line, `error: ...`, and the command exits with status 2; `--debug` shows the traceback instead.
Anything else is a bug in pefomed and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Something the user gave cannot be used as it is; the message says what and how to fix it."""


# OS errors about paths the user named are theirs to fix too.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`, turning a user error into one `error:` line and exit status 2.

    `--debug` anywhere in argv is taken out, turns on debug logging and lets the traceback through.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args = [a for a in args if a != "--debug"]
    configure_logging(logging.DEBUG if debug else logging.INFO)
    try:
        result = main(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return " ".join(text.split())


def configure_logging(level: int = logging.INFO) -> None:
    """pefomed's library messages go through `logging`; the commands show them on stderr.

    Under torchrun only rank 0 shows INFO; the other ranks show warnings and errors.
    """
    import os

    if int(os.environ.get("RANK", "0")) != 0 and level > logging.DEBUG:
        level = logging.WARNING
    logger = logging.getLogger("pefomed")
    logger.setLevel(level)
    if not any(getattr(h, "_pefomed", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._pefomed = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
