"""Reading checkpoints without running code from them.

``torch.load(weights_only=False)`` unpickles whatever a file holds, and a pickle can call any
function: a checkpoint someone downloaded could run code on load. snvbert's checkpoints (the
ones ``snvbert.train`` writes, Lightning's loop and callback states included, and the shipped
default model) are tensors and plain Python values only, so every load here is
``weights_only=True`` with nothing allow-listed; a file that holds any other object is refused
in one line, and never unpickled further.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from snvbert.errors import SnvbertError


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True``.

    A missing or unreadable file, or one that is not a torch checkpoint, and one that holds
    anything but tensors and plain values, are one-line :class:`SnvbertError`\\ s naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise SnvbertError("no such checkpoint file", path=path)
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise SnvbertError(
            f"the checkpoint holds an object that is not a tensor or a plain value{what}; "
            "snvbert loads checkpoints with weights_only=True and runs no code from them: "
            "use a checkpoint written by snvbert.train, or re-save this one from a copy you trust",
            path=path,
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SnvbertError(
            f"not a readable torch checkpoint ({first[:200]}); it may be truncated or another "
            "kind of file: give the .ckpt that snvbert.train wrote",
            path=path,
        ) from None
    if not isinstance(raw, dict):
        raise SnvbertError(
            f"not a snvbert checkpoint (it holds a {type(raw).__name__}, not a dict)", path=path
        )
    return raw
