"""LabDaemon 1.0's ``labdaemon.utils`` under labd: data files by extension, and the io helpers.

Kept so that ``from labdaemon.utils import save_json`` becomes ``from labd.utils import
save_json`` with nothing else changed. New code should use ``labd.save_json`` and friends.

- :class:`LabDaemonJSONEncoder`: ``json.dumps(data, cls=LabDaemonJSONEncoder)`` writes NumPy
  arrays as lists and NumPy scalars as numbers.
- :func:`save_data` / :func:`load_data` pick JSON (``.json``) or HDF5 (``.h5``, ``.hdf5``)
  from the extension (or ``format=``). A JSON file holds ``{"data": ..., "metadata": ...}``
  with :func:`labd.capture_metadata` merged with your keyword metadata, as in LabDaemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from labd.errors import InvalidArgumentError
from labd.io import capture_metadata, load_hdf5, load_json, save_hdf5, save_json

__all__ = ["LabDaemonJSONEncoder", "capture_metadata", "load_data", "load_hdf5", "load_json",
           "save_data", "save_hdf5", "save_json"]


class LabDaemonJSONEncoder(json.JSONEncoder):
    """A JSON encoder for NumPy data, as LabDaemon's: arrays become lists, scalars numbers.

    For code that calls ``json.dump(..., cls=LabDaemonJSONEncoder)`` itself; labd's own
    :func:`labd.save_json` also handles sets, complex numbers and non-finite floats. Example::

        json.dumps({"power": np.array([1.0, 2.0]), "n": np.int64(3)}, cls=LabDaemonJSONEncoder)
    """

    def default(self, o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):  # np.int64, np.float32, np.bool_, ...
            return o.item()
        return super().default(o)


_FORMATS = {".json": "json", ".h5": "hdf5", ".hdf5": "hdf5"}


def _format(filepath: Path, format: str) -> str:
    if format != "auto":
        chosen = str(format).lower()
        if chosen not in ("json", "hdf5"):
            raise InvalidArgumentError(f"Unsupported format {format!r}; use 'json', 'hdf5' or 'auto'.")
        return chosen
    detected = _FORMATS.get(filepath.suffix.lower())
    if detected is None:
        raise InvalidArgumentError(
            f"Cannot tell the format of {str(filepath)!r} from its extension "
            f"{filepath.suffix!r}; use .json, .h5 or .hdf5, or pass format='json' or 'hdf5'."
        )
    return detected


def save_data(
    data: dict[str, Any],
    filepath: str | os.PathLike[str],
    format: str = "auto",
    overwrite: bool = False,
    **metadata: Any,
) -> None:
    """Save ``data`` as JSON or HDF5 (by extension), with provenance metadata.

    Example: ``save_data({"wl": wl, "power": p}, "sweep.h5", sample="chip-7")``.
    Raises ``FileExistsError`` if the file exists and ``overwrite`` is False.
    """
    path = Path(filepath)
    if _format(path, format) == "hdf5":
        save_hdf5(data, path, metadata=metadata, overwrite=overwrite)
        return
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True to replace it.")
    save_json({"data": data, "metadata": capture_metadata(**metadata)}, path)


def load_data(
    filepath: str | os.PathLike[str], format: str = "auto", return_metadata: bool = False
) -> Any:
    """Load what :func:`save_data` wrote: the data, or ``(data, metadata)``."""
    path = Path(filepath)
    if _format(path, format) == "hdf5":
        return load_hdf5(path, return_metadata=True) if return_metadata else load_hdf5(path)
    content = load_json(path)
    if isinstance(content, dict) and set(content) == {"data", "metadata"}:
        data, metadata = content["data"], content["metadata"]
    else:  # a plain JSON file: all of it is data
        data, metadata = content, {}
    return (data, metadata) if return_metadata else data
