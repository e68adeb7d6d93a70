"""Every input file is read through dpcam.guard: a truncated, empty or mis-shaped file is one line naming it and
the fix (issue 25, case 3), never a BadZipFile or a numpy error without a file name."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpcam import guard
from dpcam.errors import UserError

FIX = "run `dpcam explain r` again"


def _one_line(err: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and msg.endswith(FIX), msg
    for w in words:
        assert w in msg, msg
    return msg


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("mmap", [False, True])
def test_a_truncated_npy_names_the_file_and_the_bytes_missing(mmap):
    path = Path("maps.npy")
    np.save(path, np.zeros((50, 16, 16), np.float16))
    _truncate(path)
    with pytest.raises(UserError) as err:
        guard.read_npy(path, fix=FIX, mmap=mmap)
    _one_line(err, path, "truncated (", "bytes its header declares")


def test_an_empty_or_foreign_npy_is_one_line():
    path = Path("map_indices.npy")
    path.write_bytes(b"")
    with pytest.raises(UserError) as err:
        guard.read_npy(path, fix=FIX)
    _one_line(err, path, "empty (0 bytes)")
    path.write_bytes(b"not numpy at all")
    with pytest.raises(UserError) as err:
        guard.read_npy(path, fix=FIX)
    _one_line(err, path, "not a .npy file")
    with pytest.raises(UserError, match=r"^missing nothere\.npy; run"):
        guard.read_npy(Path("nothere.npy"), fix=FIX)


def test_an_npy_of_the_wrong_shape_or_dtype_is_one_line():
    path = Path("maps.npy")
    np.save(path, np.zeros((40, 16, 16), np.float16))
    with pytest.raises(UserError) as err:
        guard.read_npy(path, fix=FIX, shape=(50, None, None))
    _one_line(err, path, "has shape (40, 16, 16), expected (50, any, any)")
    with pytest.raises(UserError) as err:
        guard.read_npy(path, fix=FIX, dtype=np.integer)
    _one_line(err, path, "has dtype float16, expected integer")
    assert guard.read_npy(path, fix=FIX, shape=(40, None, None), dtype=np.floating).shape == (40, 16, 16)


def test_a_truncated_npz_is_one_line_not_a_bad_zip_file():
    path = Path("per_image.npz")
    np.savez(path, index=np.arange(100), avg_drop_pct=np.random.default_rng(0).random(100))
    assert sorted(guard.read_npz(path, fix=FIX, keys=["index"])) == ["avg_drop_pct", "index"]
    with pytest.raises(UserError) as err:
        guard.read_npz(path, fix=FIX, keys=["pred"])
    _one_line(err, path, "has no array 'pred' (it has: avg_drop_pct, index)")
    _truncate(path, 0.7)
    with pytest.raises(UserError) as err:
        guard.read_npz(path, fix=FIX)
    _one_line(err, path, "not a readable .npz archive (truncated or overwritten")


@pytest.mark.parametrize("text, words", [("", "empty (0 bytes)"), ('{"run_name": "r", "ima', "not valid JSON")])
def test_an_empty_or_truncated_json_is_one_line(text, words):
    path = Path("explain.json")
    path.write_text(text)
    with pytest.raises(UserError) as err:
        guard.read_json(path, fix=FIX)
    _one_line(err, path, words)


def test_a_truncated_or_foreign_torch_file_is_one_line():
    path = Path("model.pt")
    torch.save({"w": torch.zeros(100, 100)}, path)
    assert guard.read_pt(path, fix=FIX)["w"].shape == (100, 100)
    _truncate(path)
    with pytest.raises(UserError) as err:
        guard.read_pt(path, fix=FIX)
    msg = _one_line(err, path, "not a readable torch file")
    assert "weights_only" not in msg
    torch.save([1, 2], path)
    with pytest.raises(UserError) as err:
        guard.read_pt(path, fix=FIX)
    _one_line(err, path, "holds a list, not a dict")


def test_a_prepared_dataset_with_a_truncated_array_is_one_line_naming_it():
    from dpcam.data.store import load_dataset
    from tests.conftest import make_tiny

    folder = make_tiny()
    for name in ("images.npy", "labels.npy", "splits.npz"):
        saved = (folder / name).read_bytes()
        _truncate(folder / name)
        with pytest.raises(UserError) as err:
            load_dataset(folder)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{folder / name}") and "dpcam prepare" in msg, msg
        (folder / name).write_bytes(saved)
    np.save(folder / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(UserError, match=r"labels\.npy has shape \(7,\), expected \(240,\)"):
        load_dataset(folder)


def test_figure_cams_reads_the_saved_maps_through_the_guard():
    """`dpcam figure cams` reads maps.npy and map_indices.npy: a truncated one is one line naming it, exit 2."""
    from typer.testing import CliRunner

    from dpcam.cli import app

    folder = Path("metrics/r")
    folder.mkdir(parents=True)
    Path("models/r").mkdir(parents=True)
    (Path("models/r") / "model.json").write_text("{}")
    (folder / "explain.json").write_text(json.dumps({"schema": 1}))
    for name, shape in (("map_indices.npy", None), ("maps.npy", None), ("maps.npy", (12, 16, 16))):
        np.save(folder / "map_indices.npy", np.arange(10))
        np.save(folder / "maps.npy", np.zeros(shape or (10, 16, 16), np.float16))
        if shape is None:
            _truncate(folder / name)
        res = CliRunner().invoke(app, ["figure", "cams", "--runs", "r"])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {folder / name}"), lines
        assert ("truncated" if shape is None else "has shape (12, 16, 16), expected (10, any, any)") in lines[0]
