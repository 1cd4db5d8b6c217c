"""Atomic outputs and the htslib command-line tools (bgzip, tabix, bcftools)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from snvbert.errors import SnvbertError

_DEBIAN_PACKAGE = {"bgzip": "tabix", "tabix": "tabix", "bcftools": "bcftools"}


def require_tool(name: str) -> str:
    """Path of an htslib tool, or a one-line error saying how to install it."""
    found = shutil.which(name)
    if found is None:
        pkg = _DEBIAN_PACKAGE.get(name, name)
        raise SnvbertError(
            f"the '{name}' program is needed and was not found on PATH; run `make install` "
            f"or `apt-get install {pkg}`"
        )
    return found


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffixes: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    ``suffixes`` names companion files written next to the temporary one (such as ``.tbi`` or
    ``.csi``): they are renamed with it, or removed with it on failure. Nothing half-written is
    ever left at ``path``. The temporary name carries the writer's process id: a process killed
    outright (SIGKILL, a node lost) cannot remove its own, so the next write of ``path`` removes
    those of processes that no longer run.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    fd, tmp_name = tempfile.mkstemp(
        prefix=partial_prefix(final), suffix=".partial", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); outputs get the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    suffixes = tuple(suffixes)
    try:
        yield tmp
        for suffix in suffixes:
            companion = Path(str(tmp) + suffix)
            if companion.exists():
                os.replace(companion, str(final) + suffix)
        os.replace(tmp, final)
    finally:
        for leftover in [tmp, *(Path(str(tmp) + s) for s in suffixes)]:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def partial_prefix(final: Path) -> str:
    """The start of the name of a temporary file or folder that becomes ``final`` when whole:
    hidden, and with the writing process's id (see :func:`remove_stale_partials`)."""
    return f".{final.name}.{os.getpid()}."


def remove_stale_partials(final: Path) -> None:
    """Remove the temporary files and folders (``.partial``, and their companions) of writes of
    ``final`` whose processes were killed; those of running processes stay."""
    for leftover in final.parent.glob(f".{glob.escape(final.name)}.*.partial*"):
        pid = leftover.name[len(final.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_bgzipped_vcf(
    lines: Iterable[str | bytes], out: str | os.PathLike, *, threads: int = 2
) -> Path:
    """Write VCF text lines (each ending in a newline; str or, already encoded, bytes) as ``out``
    (bgzipped) plus a tabix index.

    The file and its ``.tbi`` appear together, atomically, when both are complete.
    """
    bgzip = require_tool("bgzip")
    tabix = require_tool("tabix")
    out = Path(out)
    with atomic_path(out, suffixes=(".tbi",)) as tmp:
        with open(tmp, "wb") as sink:
            proc = subprocess.Popen(
                [bgzip, "-c", "-@", str(threads)], stdin=subprocess.PIPE, stdout=sink
            )
            assert proc.stdin is not None
            try:
                for line in lines:
                    proc.stdin.write(line if isinstance(line, bytes) else line.encode())
            finally:
                proc.stdin.close()
                code = proc.wait()
        if code != 0:
            raise SnvbertError(f"bgzip failed with exit code {code}", path=out)
        # tabix names its index after the file; the temporary name keeps it beside tmp.
        result = subprocess.run(
            [tabix, "-f", "-p", "vcf", str(tmp)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SnvbertError(
                f"tabix could not index the output: {result.stderr.strip()}", path=out
            )
    return out
