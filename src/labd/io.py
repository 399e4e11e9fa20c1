"""Save and load measurement data: NumPy-aware JSON, nested-dict HDF5, provenance.

JSON (`save_json` / `load_json`), written with orjson:
  numpy arrays -> lists (and load back as lists: `np.asarray` them), numpy scalars -> numbers,
  datetime/date/time -> ISO strings, paths -> strings, sets -> sorted lists, tuples -> lists,
  enums -> their value, dataclasses -> dicts, non-str dict keys -> strings (as stdlib json).
  What plain JSON cannot hold is written as a one-key marker object, decoded again on load:
  NaN/inf/-inf -> {"__float__": "nan" | "inf" | "-inf"} (also inside arrays) and
  complex -> {"__complex__": [re, im]}. A dict of exactly that shape is therefore reserved.
HDF5 (`save_hdf5` / `load_hdf5`), LabDaemon 1.0's layout, so each reads the other's files:
  /data      dicts -> groups; arrays and rectangular lists of numbers -> datasets (gzip from
             8 KiB; load back as np.ndarray); scalars and strings -> scalar datasets (load back
             as Python scalars); lists of strings -> string datasets (load back as lists);
             None -> empty dataset with attribute is_none; any other list (mixed, ragged, of
             dicts, empty) -> group "0", "1", ... with attribute labd_kind="list".
  /metadata  attributes: capture_metadata() updated with the caller's metadata; values other
             than str/int/float/bool are JSON text, their names listed in labd_json_keys.
Every save writes a temporary file beside the target and renames it into place: a failed
save leaves no partial file and the previous file intact.
"""

from __future__ import annotations

import dataclasses
import enum
import getpass
import importlib.metadata
import math
import os
import platform
import secrets
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime, time
from pathlib import Path, PurePath
from typing import Any, Literal, overload

import numpy as np
import orjson

__all__ = [
    "UnsupportedDataError",
    "capture_metadata",
    "dumps_json",
    "load_hdf5",
    "load_json",
    "loads_json",
    "save_hdf5",
    "save_json",
]

PathArg = str | os.PathLike[str]
_SUPPORTED = (
    "dict, list, tuple, set, str, int, float, complex, bool, None, numpy arrays and scalars, "
    "datetime/date/time, pathlib paths, enums, dataclasses"
)
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_INT_RANGE = range(-(2**63), 2**64)  # what orjson and HDF5 integers can hold
_JSON_KEYS_ATTR = "labd_json_keys"  # a metadata attribute naming the JSON-encoded ones
_COMPRESS_MIN_BYTES = 8192  # below this, chunking + gzip costs more than it saves


class UnsupportedDataError(TypeError, ValueError):
    """Data holds a value the file format cannot store; the message names its key path.

    A TypeError, and also a ValueError because LabDaemon 1.0's save_hdf5 raised ValueError.
    """


def _unsupported(path: str, obj: object, fmt: str) -> UnsupportedDataError:
    return UnsupportedDataError(
        f"{path}: cannot save object of type {type(obj).__name__} to {fmt}; supported: "
        f"{_SUPPORTED}. Convert it first (e.g. to a dict, number or str)."
    )


def _utf8(text: str, path: str) -> str:
    """Return `text` if it can be written as UTF-8 (lone surrogates, e.g. from bad file names, cannot)."""
    try:
        text.isascii() or text.encode()
    except UnicodeEncodeError as exc:
        raise UnsupportedDataError(
            f"{path}: string {text!r} is not valid Unicode ({exc.reason})."
        ) from None
    return text


def _key_text(key: object, path: str) -> str:
    """Dict keys become strings the way stdlib json does it (1 -> "1", True -> "true")."""
    if isinstance(key, str):
        return _utf8(key, path)
    if isinstance(key, bool | np.bool_) or key is None:
        return {True: "true", False: "false", None: "null"}[key if key is None else bool(key)]
    if isinstance(key, int | float | np.integer | np.floating):
        return str(key)
    raise UnsupportedDataError(
        f"{path}: key {key!r} of type {type(key).__name__} cannot be a key; use str keys."
    )


@contextmanager
def _atomic_target(filepath: PathArg) -> Iterator[Path]:
    """Yield a temporary path next to `filepath`; on success rename it over `filepath`."""
    target = Path(filepath)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- JSON


def _float_json(x: float) -> float | dict[str, str]:
    if math.isfinite(x):
        return x
    return {"__float__": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def _array_json(arr: np.ndarray[Any, Any], path: str, default: Callable[[Any], Any] | None) -> Any:
    kind = arr.dtype.kind
    # orjson writes finite, native-width numeric arrays itself, fast; the rest goes via lists.
    fast = kind in "biu" or (kind == "f" and bool(np.isfinite(arr).all()))
    if fast and arr.ndim > 0 and arr.dtype.itemsize <= 8:
        return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    if kind == "M":
        return np.datetime_as_string(arr).tolist()
    return _to_json(arr.tolist(), path, default)


def _to_json(obj: Any, path: str, default: Callable[[Any], Any] | None) -> Any:
    """Return `obj` as values orjson writes losslessly, or raise naming `path`."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return _utf8(obj, path)
    if isinstance(obj, int | np.integer):
        if int(obj) not in _INT_RANGE:
            raise UnsupportedDataError(f"{path}: integer {obj} does not fit in 64 bits.")
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _float_json(float(obj))
    if isinstance(obj, complex | np.complexfloating):
        return {"__complex__": [_float_json(float(obj.real)), _float_json(float(obj.imag))]}
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _array_json(obj, path, default)
    if isinstance(obj, Mapping):
        return {_key_text(k, path): _to_json(v, f"{path}[{k!r}]", default) for k, v in obj.items()}
    if isinstance(obj, set | frozenset):
        obj = _sorted(obj)
    if isinstance(obj, list | tuple):
        return [_to_json(v, f"{path}[{i}]", default) for i, v in enumerate(obj)]
    if isinstance(obj, np.datetime64):
        return str(np.datetime_as_string(obj))
    if isinstance(obj, datetime | date | time):
        return obj.isoformat()
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return _to_json(obj.value, path, default)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return _to_json(fields, path, default)
    if default is not None and (converted := default(obj)) is not obj:
        return _to_json(converted, path, default)
    raise _unsupported(path, obj, "JSON")


def _sorted(items: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(items)
    except TypeError:  # mixed types do not compare; any stable order beats failing
        return sorted(items, key=repr)


def _from_json(obj: Any) -> Any:
    """Undo the markers of `_to_json`: non-finite floats and complex numbers."""
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and obj.get("__float__") in _NONFINITE:
        return _NONFINITE[obj["__float__"]]
    pair = obj.get("__complex__") if len(obj) == 1 else None
    if isinstance(pair, list) and len(pair) == 2:
        return complex(_from_json(pair[0]), _from_json(pair[1]))
    return {k: _from_json(v) for k, v in obj.items()}


def _decode_json(raw: bytes | str) -> Any:
    data = orjson.loads(raw)
    text = raw if isinstance(raw, bytes) else raw.encode()
    # Skip the Python walk over large files that hold no markers at all.
    return _from_json(data) if b'"__float__"' in text or b'"__complex__"' in text else data


def dumps_json(obj: Any, *, default: Callable[[Any], Any] | None = None) -> bytes:
    """Encode ``obj`` as compact JSON bytes with the same lossless markers as :func:`save_json`.

    Used for run-store rows and anywhere labd persists user data; :func:`loads_json` decodes.
    """
    return orjson.dumps(_to_json(obj, "data", default), option=orjson.OPT_SERIALIZE_NUMPY)


def loads_json(raw: bytes | str) -> Any:
    """Decode what :func:`dumps_json` (or :func:`save_json`) wrote."""
    return _decode_json(raw)


def save_json(
    data: Any,
    filepath: PathArg,
    indent: bool | int | None = True,
    *,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write `data` to a JSON file atomically, NumPy-aware, NaN/inf/complex preserving.

    For results and settings you want to read anywhere; see the module docstring for the
    encoding. `indent` truthy means 2-space indent (LabDaemon's `indent=4` is accepted);
    `default` converts otherwise unsupported objects. Creates parent directories.

    >>> save_json({"wl": np.linspace(1500, 1600, 3), "gain": float("nan")}, "run/sweep.json")
    PosixPath('run/sweep.json')
    """
    payload = _to_json(data, "data", default)
    options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    options |= orjson.OPT_INDENT_2 if indent else 0
    options |= orjson.OPT_SORT_KEYS if sort_keys else 0
    encoded = orjson.dumps(payload, option=options)
    with _atomic_target(filepath) as tmp, open(tmp, "xb") as fh:
        fh.write(encoded)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(filepath)


def load_json(filepath: PathArg) -> Any:
    """Read a JSON file written by `save_json` (or any JSON), restoring NaN/inf and complex.

    Arrays come back as (nested) lists, as in LabDaemon; wrap them in `np.asarray`.

    >>> wl = np.asarray(load_json("run/sweep.json")["wl"])
    """
    raw = Path(filepath).read_bytes()
    try:
        return _decode_json(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{filepath} is not valid JSON: {exc}") from exc


# ---------------------------------------------------------------- HDF5


def _h5py() -> Any:
    try:
        import h5py  # optional dependency: imported on first use
    except ImportError as exc:
        raise ImportError("save_hdf5 needs h5py: pip install 'labd[hdf5]'") from exc
    return h5py


def _h5_name(key: object, path: str) -> str:
    name = _key_text(key, path)
    if name in ("", ".") or "/" in name or "\x00" in name:
        raise UnsupportedDataError(
            f"{path}: key {name!r} cannot be an HDF5 name (no '/', NUL, '' or '.'); rename it."
        )
    return name


def _check_text(text: str, path: str) -> str:
    if "\x00" in text:  # HDF5 strings are NUL-terminated: the rest would be lost silently
        raise UnsupportedDataError(f"{path}: HDF5 strings cannot contain NUL characters.")
    return _utf8(text, path)


def _list_array(items: list[Any] | tuple[Any, ...]) -> np.ndarray[Any, Any] | None:
    """`items` as an array if it is a rectangular list of only bools, numbers or strings.

    Strings come back as an object array; anything else (mixed, ragged, dicts, None, empty,
    ints that a float array cannot hold exactly) returns None and is stored as a list group,
    which round-trips every item as it is.
    """
    try:
        leaves = np.asarray(items, dtype=object).ravel().tolist()
        if leaves and all(isinstance(v, str) for v in leaves):
            return np.asarray(items, dtype=object)
        if leaves and all(isinstance(v, bool | np.bool_) for v in leaves):
            return np.asarray(items, dtype=bool)
        numbers = (int, float, complex, np.number)
        if not leaves or not all(isinstance(v, numbers) and type(v) is not bool for v in leaves):
            return None
        arr = np.asarray(items)
    except ValueError:
        # Ragged nesting. An object array can also hold arrays of shapes (1, 1) and (1,)
        # side by side, which no numeric array can: those are stored item by item too.
        return None
    ints = [v for v in leaves if isinstance(v, int | np.integer)]
    if len(ints) == len(leaves):
        return arr if arr.dtype.kind in "iu" else None  # e.g. [-1, 2**63] would become floats
    if arr.dtype.kind not in "fc":
        return None
    # Ints mixed with floats become floats: only when every int survives that exactly.
    return arr if all(float(v) == v for v in ints) else None


def _h5_strings(group: Any, name: str, arr: np.ndarray[Any, Any], path: str, kind: str) -> None:
    for text in arr.ravel().tolist():
        _check_text(text, path)
    ds = group.create_dataset(name, data=arr.astype(object), dtype=_h5py().string_dtype())
    ds.attrs["labd_kind"] = kind


def _h5_array(group: Any, name: str, arr: np.ndarray[Any, Any], path: str, comp: Any) -> None:
    if arr.dtype.kind == "U":
        return _h5_strings(group, name, arr, path, "str_array")
    if arr.dtype.kind not in "biufcS":
        raise _unsupported(path, arr, f"HDF5 (numpy dtype {arr.dtype})")
    big = arr.ndim > 0 and arr.nbytes >= _COMPRESS_MIN_BYTES
    group.create_dataset(name, data=arr, compression=comp if big else None)


def _h5_scalar(value: Any, path: str) -> Any:
    if isinstance(value, str):
        return _check_text(value, path)
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if int(value) not in _INT_RANGE:
            raise UnsupportedDataError(f"{path}: integer {value} does not fit in 64 bits.")
        return value
    if isinstance(value, bool | float | complex | np.bool_ | np.floating | np.complexfloating):
        return value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    raise _unsupported(path, value, "HDF5")


def _h5_write(group: Any, key: object, value: Any, path: str, comp: Any) -> None:
    name, path = _h5_name(key, path), f"{path}[{key!r}]"
    if isinstance(value, Mapping):
        _h5_write_dict(group.create_group(name, track_order=True), value, path, comp)
    elif value is None:  # LabDaemon 1.0's encoding of None, kept so both read each other
        group.create_dataset(name, data=_h5py().Empty("f")).attrs["is_none"] = True
    elif isinstance(value, np.ndarray):
        _h5_array(group, name, value, path, comp)
    elif isinstance(value, list | tuple) and (arr := _list_array(value)) is not None:
        if arr.dtype == object:
            _h5_strings(group, name, arr, path, "str_list")
        else:
            _h5_array(group, name, arr, path, comp)
    elif isinstance(value, list | tuple):
        sub = group.create_group(name, track_order=True)
        sub.attrs["labd_kind"] = "list"
        for i, item in enumerate(value):
            _h5_write(sub, i, item, path, comp)
    else:
        group.create_dataset(name, data=_h5_scalar(value, path))


def _h5_write_dict(group: Any, data: Mapping[Any, Any], path: str, comp: Any) -> None:
    for key, value in data.items():
        _h5_write(group, key, value, path, comp)


def _attr_native(value: Any, path: str) -> bool:
    """Whether HDF5 can hold `value` as a plain attribute (else it is stored as JSON text)."""
    if isinstance(value, str):
        return "\x00" not in _utf8(value, path)
    if isinstance(value, int | np.integer):
        return int(value) in _INT_RANGE
    return isinstance(value, float | np.bool_ | np.floating)


def _h5_write_metadata(group: Any, metadata: Mapping[Any, Any]) -> None:
    json_keys = []
    for key, value in metadata.items():
        name, path = _check_text(_key_text(key, "metadata"), "metadata"), f"metadata[{key!r}]"
        if name == _JSON_KEYS_ATTR:
            raise UnsupportedDataError(
                f"{path}: the metadata key {name!r} is reserved by labd (it lists the keys "
                "stored as JSON text); rename it."
            )
        if _attr_native(value, path):
            group.attrs[name] = value
        else:
            payload = _to_json(value, path, None)
            group.attrs[name] = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY).decode()
            json_keys.append(name)
    if json_keys:
        group.attrs[_JSON_KEYS_ATTR] = orjson.dumps(json_keys).decode()


def _h5_read(item: Any) -> Any:
    h5py = _h5py()
    if isinstance(item, h5py.Group):
        if item.attrs.get("labd_kind") == "list":
            return [_h5_read(item[name]) for name in sorted(item, key=int)]
        return {name: _h5_read(child) for name, child in item.items()}
    if item.shape is None or item.attrs.get("is_none", False):  # shape None: empty dataset
        return None
    if h5py.check_string_dtype(item.dtype) is not None:
        text = item.asstr()[()]
        if item.attrs.get("labd_kind") == "str_array":
            return text.astype(str)
        return text.tolist() if isinstance(text, np.ndarray) else text
    value = item[()]
    return value.item() if isinstance(value, np.generic) else value


def _h5_read_metadata(group: Any) -> dict[str, Any]:
    json_keys = set(orjson.loads(group.attrs.get(_JSON_KEYS_ATTR, "[]")))
    metadata: dict[str, Any] = {}
    for name, value in group.attrs.items():
        if name in json_keys:
            metadata[name] = _decode_json(value)
        elif name != _JSON_KEYS_ATTR:
            metadata[name] = value.item() if isinstance(value, np.generic) else value
    return metadata


def save_hdf5(
    data: Mapping[str, Any],
    filepath: PathArg,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    *,
    compression: str | int | None = "gzip",
) -> Path:
    """Write a nested dict of arrays and scalars to an HDF5 file atomically, with provenance.

    For large numeric results (traces, images); the layout is in the module docstring and
    matches LabDaemon 1.0. `capture_metadata()` is always recorded, updated with `metadata`.
    Like LabDaemon, refuses to replace an existing file unless `overwrite=True`.

    >>> save_hdf5({"trace": {"t": t, "v": v}}, "run/daq.h5", {"sample_rate": 1e5})
    PosixPath('run/daq.h5')
    """
    h5py = _h5py()
    if not isinstance(data, Mapping):
        raise TypeError(f"save_hdf5 needs a dict of data, got {type(data).__name__}.")
    target = Path(filepath)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it.")
    full_metadata = {**capture_metadata(), **(metadata or {})}
    with _atomic_target(target) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["labd_format"] = 1
            _h5_write_dict(f.create_group("data", track_order=True), data, "data", compression)
            _h5_write_metadata(f.create_group("metadata", track_order=True), full_metadata)
        with open(tmp, "r+b") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
    return target


@overload
def load_hdf5(filepath: PathArg, return_metadata: Literal[False] = False) -> dict[str, Any]: ...
@overload
def load_hdf5(
    filepath: PathArg, return_metadata: Literal[True]
) -> tuple[dict[str, Any], dict[str, Any]]: ...
def load_hdf5(
    filepath: PathArg, return_metadata: bool = False
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any]]:
    """Read a file written by `save_hdf5` (or LabDaemon 1.0) back into nested dicts.

    Returns the data dict, or `(data, metadata)` with `return_metadata=True`, as LabDaemon did.
    A file with no /data group is read whole, so any HDF5 file of groups and datasets loads.

    >>> data, meta = load_hdf5("run/daq.h5", return_metadata=True)
    >>> data["trace"]["v"].mean(), meta["timestamp"]
    """
    h5py = _h5py()
    path = Path(filepath)
    if not path.is_file():
        raise FileNotFoundError(f"No HDF5 file at {path}.")
    with h5py.File(path, "r") as f:
        data_group = f.get("data")
        data = _h5_read(data_group if isinstance(data_group, h5py.Group) else f)
        meta_group = f.get("metadata")
        metadata = _h5_read_metadata(meta_group) if isinstance(meta_group, h5py.Group) else {}
    return (data, metadata) if return_metadata else data


# ---------------------------------------------------------------- provenance


def _labd_version() -> str:
    try:
        return importlib.metadata.version("labd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_commit(directory: str | None) -> str | None:
    if directory is None:
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=2.0,  # a hung git (network filesystem) must not stall a save
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def _safe(read: Callable[[], str]) -> str | None:
    try:
        return read()
    except (OSError, KeyError):  # e.g. deleted cwd, user without a passwd entry
        return None


def capture_metadata(**extra: Any) -> dict[str, Any]:
    """Describe where and when data was taken: time, machine, user, versions, git commit.

    Store it beside results so a file says how it was made; `save_hdf5` records it itself.
    `git_commit` is present only inside a git repository; `extra` is merged in last.

    >>> capture_metadata(sample="SiN-07")["timestamp"]
    '2025-03-01T12:03:07Z'
    """
    cwd = _safe(os.getcwd)
    metadata: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "hostname": platform.node(),
        "user": _safe(getpass.getuser),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "labd_version": _labd_version(),
        "numpy_version": np.__version__,
        "working_directory": cwd,
    }
    commit = _git_commit(cwd)
    if commit is not None:
        metadata["git_commit"] = commit
    metadata.update(extra)
    return metadata
