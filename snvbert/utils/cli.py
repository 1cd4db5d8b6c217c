"""Entry-point glue shared by every ``python -m snvbert.<command>``."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from snvbert.errors import SnvbertError

log = logging.getLogger("snvbert")


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn``; on :class:`SnvbertError` print one line to stderr and exit 2.

    Hydra wraps the task function and prints a stack trace for any exception, so the task
    function itself catches the project's own error type. Bugs (any other exception) still show
    their traceback, as they should.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SnvbertError as err:
            print(f"snvbert: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("snvbert: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
