"""labd.io: JSON and HDF5 round-trips, error messages that name the key path, atomic saves."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from labd.io import (
    UnsupportedDataError,
    capture_metadata,
    load_hdf5,
    load_json,
    save_hdf5,
    save_json,
)

# ---------------------------------------------------------------- comparison


def same(loaded: Any, original: Any) -> bool:
    """Equal, exactly: NaN equals NaN, -0.0 is not 0.0, and an int is not its nearest float.

    An array may come back as a list or a list as an array (HDF5 stores rectangular numeric
    lists as datasets); then each element is compared by value, so a list of ints that came
    back as a float array is the same only if every int survived the conversion exactly.
    """
    if isinstance(original, np.ndarray):
        got = np.asarray(loaded, dtype=original.dtype)
        return (
            got.shape == original.shape
            and np.array_equal(got, original, equal_nan=True)
            and _same_zero_signs(got, original)
        )
    if isinstance(loaded, np.ndarray) and isinstance(original, list | tuple):
        return same(loaded.tolist(), _plain(original)) or _same_numbers(loaded, original)
    if isinstance(original, dict):
        return (
            isinstance(loaded, dict)
            and list(loaded) == list(original)
            and all(same(loaded[k], v) for k, v in original.items())
        )
    if isinstance(original, list | tuple):
        return (
            isinstance(loaded, list)
            and len(loaded) == len(original)
            and all(same(a, b) for a, b in zip(loaded, original, strict=True))
        )
    if isinstance(original, float):
        return isinstance(loaded, float) and _same_float(loaded, original)
    if isinstance(original, complex):
        return (
            isinstance(loaded, complex)
            and _same_float(loaded.real, original.real)
            and _same_float(loaded.imag, original.imag)
        )
    return type(loaded) is type(original) and loaded == original


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _same_zero_signs(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    if a.dtype.kind == "c":
        return _same_zero_signs(a.real, b.real) and _same_zero_signs(a.imag, b.imag)
    if a.dtype.kind != "f":
        return True
    zeros = b == 0  # the sign of a NaN carries no meaning; only -0.0 vs 0.0 counts
    return bool(np.array_equal(np.signbit(a[zeros]), np.signbit(b[zeros])))


def _plain(value: Any) -> Any:
    """Arrays inside a list as nested Python lists, to compare with an array's `tolist()`."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _same_numbers(loaded: np.ndarray[Any, Any], original: list[Any] | tuple[Any, ...]) -> bool:
    """A numeric list that came back as an array: same shape, and each value exactly equal."""
    flat = np.asarray(original, dtype=object)
    if flat.shape != loaded.shape:
        return False
    for got, want in zip(loaded.ravel().tolist(), flat.ravel().tolist(), strict=True):
        want = want.item() if isinstance(want, np.generic) else want
        if isinstance(want, bool) != isinstance(got, bool):
            return False
        if isinstance(got, complex) or isinstance(want, complex):
            if not same(complex(got), complex(want)):
                return False
        elif isinstance(got, float) or isinstance(want, float):
            # Python compares an int and a float exactly: 2**53 + 1 != 2.0**53.
            if not (got == want or (math.isnan(got) and math.isnan(want))):
                return False
            if got == 0 and math.copysign(1.0, got) != math.copysign(1.0, float(want)):
                return False
        elif got != want:
            return False
    return True


# ---------------------------------------------------------------- strategies

DTYPES = [np.float64, np.float32, np.int64, np.int32, np.uint8, np.bool_, np.complex128]
arrays = hnp.arrays(
    dtype=st.sampled_from(DTYPES),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
)
int64s = st.integers(-(2**63), 2**63 - 1)
# What labs store and random draws rarely reach: signed zeros, NaN and infinities, the
# extremes of float64, and ints that a float64 cannot hold exactly.
special_floats = st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308])
edge_ints = st.sampled_from([0, -1, 2**53 + 1, -(2**53 + 1), 2**63 - 1, -(2**63)])
scalars = (
    st.none()
    | st.booleans()
    | int64s
    | edge_ints
    | st.floats()  # includes NaN, +inf, -inf
    | special_floats
    | st.complex_numbers()
)
# Nested lists of mixed numbers (rectangular or ragged), with empty lists among them.
numbers = edge_ints | st.integers(-3, 3) | special_floats | st.floats() | st.complex_numbers()
number_lists = st.recursive(
    numbers | st.just([]), lambda children: st.lists(children, max_size=4), max_leaves=10
)
# Arrays whose sides are all 1 make lists of arrays of different ndim but compatible
# leading shapes, e.g. [zeros((1, 1)), zeros(1)]: the input that broke save_hdf5 (issue 11).
unit_arrays = hnp.arrays(
    dtype=st.sampled_from(DTYPES),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=1),
)


def trees(keys: st.SearchStrategy[str], texts: st.SearchStrategy[str]) -> Any:
    leaves = scalars | texts | arrays | number_lists | st.lists(unit_arrays, max_size=3)
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=12,
    )


# Each example overwrites the same file in tmp_path, so sharing the fixture is harmless.
reuses_tmp_path = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

json_keys = st.text(max_size=8)
# Lone surrogates (category Cs) cannot be encoded and are rejected; see the test for that.
h5_texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8)
h5_keys = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="/\x00"), min_size=1, max_size=8
).filter(lambda k: k not in (".", "labd_json_keys")) | st.sampled_from(
    ["é", "e\u0301", "µW", "波长", "0", "1", "data", "metadata", " ", ".."]
)


# ---------------------------------------------------------------- JSON


@pytest.mark.fuzz
@reuses_tmp_path
@given(data=st.dictionaries(json_keys, trees(json_keys, st.text()), max_size=5))
def test_json_round_trips_nested_data(tmp_path: Path, data: dict[str, Any]) -> None:
    path = save_json(data, tmp_path / "data.json")
    assert same(load_json(path), data)


def test_json_nan_and_inf_round_trip_in_scalars_and_arrays(tmp_path: Path) -> None:
    data = {
        "gain": math.nan,
        "limits": [-math.inf, math.inf],
        "trace": np.array([[1.0, np.nan], [np.inf, -np.inf]]),
        "f32": np.array([np.nan, 1.5], dtype=np.float32),
        "z": complex(math.nan, -math.inf),
    }
    loaded = load_json(save_json(data, tmp_path / "x.json"))
    assert same(loaded, data)
    assert isinstance(loaded["trace"], list)  # arrays load back as lists, as in LabDaemon
    raw = json.loads((tmp_path / "x.json").read_text())
    assert raw["gain"] == {"__float__": "nan"}
    assert raw["trace"][1] == [{"__float__": "inf"}, {"__float__": "-inf"}]
    assert raw["z"] == {"__complex__": [{"__float__": "nan"}, {"__float__": "-inf"}]}


def test_json_is_plain_json_other_tools_can_read(tmp_path: Path) -> None:
    save_json({"a": np.arange(3), "b": math.inf}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {
        "a": [0, 1, 2],
        "b": {"__float__": "inf"},
    }


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: float
    y: float


def test_json_converts_common_python_and_numpy_types(tmp_path: Path) -> None:
    data = {
        "when": datetime(2025, 3, 1, 12, 3, 7, tzinfo=UTC),
        "day": date(2025, 3, 1),
        "where": Path("/data/run1"),
        "tags": {"b", "a"},
        "pair": (1, 2),
        "f32": np.float32(0.5),
        "i8": np.int8(-3),
        "flag": np.bool_(True),
        "z": 1 + 2j,
        "colour": Colour.RED,
        "point": Point(1.0, 2.0),
        3: "int key",
        "ts": np.datetime64("2025-03-01T12:00"),
    }
    loaded = load_json(save_json(data, tmp_path / "x.json"))
    assert loaded == {
        "when": "2025-03-01T12:03:07+00:00",
        "day": "2025-03-01",
        "where": str(Path("/data/run1")),
        "tags": ["a", "b"],
        "pair": [1, 2],
        "f32": 0.5,
        "i8": -3,
        "flag": True,
        "z": 1 + 2j,
        "colour": "red",
        "point": {"x": 1.0, "y": 2.0},
        "3": "int key",
        "ts": "2025-03-01T12:00",
    }


class Foo:
    pass


def test_json_unsupported_object_names_its_key_path(tmp_path: Path) -> None:
    data = {"results": [{"x": 1}, {"x": 2}, {"x": 3}, {"x": Foo()}]}
    with pytest.raises(TypeError) as info:
        save_json(data, tmp_path / "x.json")
    message = str(info.value)
    assert message.startswith("data['results'][3]['x']: cannot save object of type Foo to JSON")
    assert "supported:" in message
    assert isinstance(info.value, UnsupportedDataError)
    assert not (tmp_path / "x.json").exists()


def test_json_unsupported_inside_object_array_names_index(tmp_path: Path) -> None:
    data = {"arr": np.array([1, Foo()], dtype=object)}
    with pytest.raises(TypeError, match=r"^data\['arr'\]\[1\]: .*Foo"):
        save_json(data, tmp_path / "x.json")


def test_json_rejects_integers_beyond_64_bits(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"data\['n'\]: integer .* 64 bits"):
        save_json({"n": 2**70}, tmp_path / "x.json")


def test_json_rejects_strings_that_are_not_valid_unicode(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"data\['k'\]\[0\]: string '\\udcff' is not valid Unicode"):
        save_json({"k": ["\udcff"]}, tmp_path / "x.json")


def test_json_default_converts_unknown_objects(tmp_path: Path) -> None:
    path = save_json({"foo": Foo()}, tmp_path / "x.json", default=lambda obj: "a Foo")
    assert load_json(path) == {"foo": "a Foo"}


def test_json_indent_options(tmp_path: Path) -> None:
    compact = save_json({"b": 1, "a": [1]}, tmp_path / "c.json", indent=False, sort_keys=True)
    assert compact.read_text() == '{"a":[1],"b":1}\n'
    pretty = save_json({"a": [1]}, tmp_path / "p.json", 4)  # LabDaemon's positional indent
    assert pretty.read_text() == '{\n  "a": [\n    1\n  ]\n}\n'


def test_json_creates_parent_directories_and_returns_path(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    assert save_json({"a": 1}, str(target)) == target
    assert load_json(target) == {"a": 1}


def test_load_json_reports_the_file_when_it_is_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        load_json(bad)


def test_failed_json_save_leaves_previous_file_intact(tmp_path: Path) -> None:
    target = save_json({"run": 1}, tmp_path / "x.json")
    with pytest.raises(TypeError):
        save_json({"run": 2, "bad": Foo()}, target)
    assert load_json(target) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_json_save_that_fails_at_rename_removes_its_temporary_file(tmp_path: Path) -> None:
    occupied = tmp_path / "results"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("keep")
    with pytest.raises(OSError):
        save_json({"a": 1}, occupied)  # a non-empty directory cannot be replaced by a file
    assert (occupied / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


# ---------------------------------------------------------------- HDF5


@pytest.mark.fuzz
@reuses_tmp_path
@given(
    data=st.dictionaries(h5_keys, trees(h5_keys, h5_texts), max_size=5),
    metadata=st.dictionaries(h5_keys, trees(h5_keys, st.text()), max_size=3),
)
@example(data={"0": [np.zeros((1, 1)), np.zeros(1)]}, metadata={})  # issue 11: a ValueError
@example(data={"n": [2**53 + 1, 0.5]}, metadata={})  # was stored as floats, silently rounded
@example(data={"n": [[1, -0.0], [math.nan, 2**63 - 1]]}, metadata={"z": [-0.0, math.inf]})
@example(data={"e": [], "m": [[], [1, 2.5j]]}, metadata={"波长": {"µW": [math.nan]}})
def test_hdf5_round_trips_nested_data_and_metadata(
    tmp_path: Path, data: dict[str, Any], metadata: dict[str, Any]
) -> None:
    path = save_hdf5(data, tmp_path / "data.h5", metadata, overwrite=True)
    loaded, loaded_metadata = load_hdf5(path, return_metadata=True)
    assert same(loaded, data)
    assert same({k: loaded_metadata[k] for k in metadata}, metadata)


def test_hdf5_representation_of_each_kind(tmp_path: Path) -> None:
    data = {
        "trace": {"t": np.linspace(0, 1, 5), "v": np.arange(5, dtype=np.int16)},
        "numbers": [1.0, 2.5, math.nan],
        "grid": [[1, 2], [3, 4]],
        "names": ["laser1", "pm1", "é"],
        "labels": np.array(["a", "bb"]),
        "mixed": [1, "two", None, {"three": 3.0}],
        "flags": [True, False],
        "ints_and_bools": [1, True],
        "empty": [],
        "nothing": None,
        "gain": 2.5,
        "count": 7,
        "on": True,
        "name": "sweep",
        "z": 1 - 2j,
        "when": datetime(2025, 3, 1, tzinfo=UTC),
    }
    loaded = load_hdf5(save_hdf5(data, tmp_path / "x.h5"))
    assert list(loaded) == list(data)  # insertion order is kept
    assert loaded["trace"]["v"].dtype == np.int16
    assert isinstance(loaded["numbers"], np.ndarray) and np.isnan(loaded["numbers"][2])
    assert loaded["grid"].tolist() == [[1, 2], [3, 4]]
    assert loaded["names"] == ["laser1", "pm1", "é"]
    assert loaded["labels"].tolist() == ["a", "bb"] and loaded["labels"].dtype.kind == "U"
    assert loaded["mixed"] == [1, "two", None, {"three": 3.0}]
    assert loaded["flags"].dtype == np.bool_
    assert loaded["ints_and_bools"] == [1, True]
    assert loaded["empty"] == []
    assert loaded["nothing"] is None
    scalars = ("gain", "count", "on", "name", "z")
    assert [loaded[k] for k in scalars] == [2.5, 7, True, "sweep", 1 - 2j]
    assert [type(loaded[k]) for k in scalars] == [float, int, bool, str, complex]
    assert loaded["when"] == "2025-03-01T00:00:00+00:00"


def test_hdf5_metadata_holds_provenance_and_caller_values(tmp_path: Path) -> None:
    metadata = {"sample": "SiN-07", "temps": [4.2, math.nan], "cfg": {"a": None}, "n": 3}
    path = save_hdf5({"v": np.zeros(3)}, tmp_path / "x.h5", metadata=metadata)
    data, loaded = load_hdf5(path, return_metadata=True)
    assert set(data) == {"v"}
    assert loaded["sample"] == "SiN-07" and loaded["n"] == 3 and type(loaded["n"]) is int
    assert same(loaded["temps"], [4.2, math.nan]) and loaded["cfg"] == {"a": None}
    assert {"timestamp", "hostname", "labd_version", "python_version"} <= set(loaded)
    with h5py.File(path) as f:  # the documented layout, shared with LabDaemon 1.0
        assert set(f) == {"data", "metadata"}
        assert f["metadata"].attrs["sample"] == "SiN-07"
        assert json.loads(f["metadata"].attrs["cfg"]) == {"a": None}


def test_hdf5_compresses_large_arrays_only(tmp_path: Path) -> None:
    data = {"big": np.zeros(100_000), "small": np.zeros(10)}
    path = save_hdf5(data, tmp_path / "x.h5")
    raw = save_hdf5(data, tmp_path / "raw.h5", compression=None)
    with h5py.File(path) as f, h5py.File(raw) as g:
        assert f["data/big"].compression == "gzip"
        assert f["data/small"].compression is None
        assert g["data/big"].compression is None
    assert path.stat().st_size < raw.stat().st_size


def test_hdf5_reads_files_in_labdaemon_layout(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("data")
        group.create_dataset("wl", data=np.array([1500.0, 1510.0]))
        group.create_dataset("label", data=np.bytes_(b"sweep"))
        group.create_dataset("missing", data=h5py.Empty("f")).attrs["is_none"] = True
        group.create_group("sub").create_dataset("n", data=4)
        f.create_group("metadata").attrs["labdaemon_version"] = "1.0.1"
    data, metadata = load_hdf5(path, return_metadata=True)
    assert data["wl"].tolist() == [1500.0, 1510.0]
    assert data["label"] == "sweep" and data["missing"] is None and data["sub"] == {"n": 4}
    assert metadata == {"labdaemon_version": "1.0.1"}


def test_hdf5_reads_a_plain_file_without_data_group(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    assert load_hdf5(path)["x"].tolist() == [0, 1, 2]


def test_hdf5_unsupported_object_names_its_key_path(tmp_path: Path) -> None:
    data = {"results": [{"x": 1}, {"x": 2}, {"x": 3}, {"x": Foo()}]}
    with pytest.raises(TypeError) as info:
        save_hdf5(data, tmp_path / "x.h5")
    assert str(info.value).startswith(
        "data['results'][3]['x']: cannot save object of type Foo to HDF5"
    )
    assert isinstance(info.value, ValueError)  # LabDaemon 1.0 raised ValueError here
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"a": {"power/mW": 1}}, r"data\['a'\]: key 'power/mW' cannot be an HDF5 name"),
        ({".": 1}, r"key '\.' cannot be an HDF5 name"),
        ({"s": "a\x00b"}, r"data\['s'\]: HDF5 strings cannot contain NUL"),
        ({"s": ["ok", "\ud800"]}, r"data\['s'\]: string '\\ud800' is not valid Unicode"),
        ({"n": [1, 2**70]}, r"data\['n'\]\[1\]: integer .* 64 bits"),
        ({"o": np.array([Foo()], dtype=object)}, r"data\['o'\]: .*numpy dtype object"),
    ],
)
def test_hdf5_rejects_what_it_cannot_store_faithfully(
    tmp_path: Path, data: dict[str, Any], match: str
) -> None:
    with pytest.raises(UnsupportedDataError, match=match):
        save_hdf5(data, tmp_path / "x.h5")


def test_hdf5_list_of_arrays_of_different_ndim_round_trips(tmp_path: Path) -> None:
    """Issue 11: shapes (1, 1) and (1,) fit in an object array but in no numeric one."""
    data = {"traces": [np.zeros((1, 1)), np.ones(1, dtype=np.int32)]}
    loaded = load_hdf5(save_hdf5(data, tmp_path / "x.h5"))
    assert loaded["traces"][0].shape == (1, 1)
    assert loaded["traces"][1].dtype == np.int32


def test_hdf5_never_rounds_an_int_that_shares_a_list_with_floats(tmp_path: Path) -> None:
    loaded = load_hdf5(save_hdf5({"n": [2**53 + 1, 0.5], "ok": [2, 0.5]}, tmp_path / "x.h5"))
    assert loaded["n"] == [2**53 + 1, 0.5]
    assert loaded["ok"].tolist() == [2.0, 0.5]  # exact ints still make a float dataset


def test_hdf5_refuses_the_reserved_metadata_key(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedDataError, match=r"'labd_json_keys' is reserved by labd"):
        save_hdf5({}, tmp_path / "x.h5", metadata={"labd_json_keys": None})
    assert not (tmp_path / "x.h5").exists()


def test_hdf5_refuses_to_replace_a_file_unless_asked(tmp_path: Path) -> None:
    path = save_hdf5({"run": 1}, tmp_path / "x.h5")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hdf5({"run": 2}, path)
    assert load_hdf5(path) == {"run": 1}
    save_hdf5({"run": 3}, path, overwrite=True)
    assert load_hdf5(path) == {"run": 3}


def test_failed_hdf5_save_midway_leaves_previous_file_intact(tmp_path: Path) -> None:
    path = save_hdf5({"run": 1, "v": np.arange(4)}, tmp_path / "x.h5")
    # The large array is written to the temporary file before the bad value is reached.
    bad = {"run": 2, "v": np.zeros(100_000), "later": {"bad": Foo()}}
    with pytest.raises(UnsupportedDataError):
        save_hdf5(bad, path, overwrite=True)
    loaded = load_hdf5(path)
    assert loaded["run"] == 1 and loaded["v"].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_missing_hdf5_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No HDF5 file at"):
        load_hdf5(tmp_path / "nope.h5")


def test_hdf5_without_h5py_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match=r"pip install 'labd\[hdf5\]'"):
        save_hdf5({"a": 1}, tmp_path / "x.h5")


# ---------------------------------------------------------------- capture_metadata


def test_capture_metadata_describes_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    metadata = capture_metadata(sample="SiN-07", user="override")
    assert {
        "timestamp",
        "hostname",
        "user",
        "platform",
        "python_version",
        "labd_version",
        "numpy_version",
        "working_directory",
    } <= set(metadata)
    assert "git_commit" not in metadata  # tmp_path is not a git repository
    assert metadata["sample"] == "SiN-07" and metadata["user"] == "override"
    assert metadata["timestamp"].endswith("Z")
    stamp = datetime.fromisoformat(metadata["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert metadata["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert metadata["numpy_version"] == np.__version__
    assert Path(metadata["working_directory"]) == tmp_path
    assert isinstance(metadata["labd_version"], str)


def test_capture_metadata_records_the_git_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hermetic repository: no user or system git configuration is read.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "t")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "t@example.org")
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True, timeout=30)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], check=True, timeout=30)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert capture_metadata()["git_commit"] == head


def test_capture_metadata_never_raises_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to be found
    assert "git_commit" not in capture_metadata()
