"""labd.utils: LabDaemon's `labdaemon.utils` names, so `from labd.utils import ...` works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import labd
from labd.utils import load_data, save_data


def test_the_labdaemon_utils_names_exist() -> None:
    from labd import utils

    for name in ("save_json", "load_json", "save_hdf5", "load_hdf5", "capture_metadata",
                 "save_data", "load_data"):
        assert callable(getattr(utils, name)), name
    assert utils.save_json is labd.save_json


@pytest.mark.parametrize("suffix", [".json", ".h5", ".hdf5"])
def test_save_data_picks_the_format_from_the_extension(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"sweep{suffix}"
    save_data({"wl": [1549.0, 1550.0], "power": [0.9, 0.2]}, path, sample="chip-7")
    data, metadata = load_data(path, return_metadata=True)
    assert list(np.asarray(data["wl"])) == [1549.0, 1550.0]
    assert metadata["sample"] == "chip-7" and "timestamp" in metadata
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_data({"x": 1}, path)
    save_data({"x": 2}, path, overwrite=True)
    assert load_data(path)["x"] == 2


def test_an_unknown_extension_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.json, \.h5 or \.hdf5"):
        save_data({"x": 1}, tmp_path / "sweep.csv")
    with pytest.raises(ValueError, match="'json', 'hdf5' or 'auto'"):
        save_data({"x": 1}, tmp_path / "sweep.json", format="csv")
    assert not list(tmp_path.iterdir())  # nothing written


def test_load_data_reads_a_plain_json_file_as_data(tmp_path: Path) -> None:
    path = tmp_path / "plain.json"
    labd.save_json({"a": 1}, path)
    assert load_data(path, return_metadata=True) == ({"a": 1}, {})
