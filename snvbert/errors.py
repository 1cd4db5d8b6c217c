"""The project's one error type: a message a person can act on, printed as one line."""

from __future__ import annotations


class SnvbertError(Exception):
    """An error caused by input or configuration, not by a bug.

    Entry points print ``snvbert: error: <message>`` and exit with status 2, never a traceback.
    The message names the file (and record, as ``chrom:pos``, where there is one) and says what
    to do.
    """

    def __init__(self, message: str, *, path: object | None = None, record: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if record:
                where += f" at {record}"
            where += ": "
        super().__init__(where + message)
