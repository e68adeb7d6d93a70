import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dpcam.data import sources, store
from dpcam.data.decode import load_image
from dpcam.data.readers import APTOS_CLASSES
from dpcam.errors import UserError
from tests.data.source_helpers import OUT, make_aptos, make_folder, manifest, prep, save, smooth


def test_prepare_aptos_writes_dataset_and_manifest(tmp_path):
    src = make_aptos(tmp_path / "aptos")
    out = prep("aptos", src, size=16, split={"train": 0.6, "val": 0.2, "test": 0.2})
    assert out == OUT / "d"
    ds = store.load_dataset(out)
    assert ds.images.shape == (10, 16, 16, 3) and ds.images.dtype == np.uint8 and ds.masks is None
    assert ds.labels.tolist() == [0, 1, 2, 3, 4] * 2
    np.testing.assert_array_equal(ds.images[3], load_image(src / "train_images/id03.png", 16, fundus=True))
    m = manifest()
    assert m["kind"] == "prepared" and m["dataset"] == "d"
    assert m["source"] == {"format": "aptos", "path": str(src), "files": 10}
    assert m["classes"] == APTOS_CLASSES and m["image_size"] == 16 and m["seed"] == 0
    assert m["split_fractions"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert "fundus" in m["preprocessing"] and m["skipped"] == [] and m["masks"] is None
    assert sum(s["count"] for s in m["splits"].values()) == 10
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# -------------------------------------------------------------------------------------- bad input


def _truncate(path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def _bad_png_text(root):
    (root / "a" / "a1.png").write_text("this is not an image\n")
    return r"a1\.png: not an image Pillow can read"


def _bad_trunc_png(root):
    _truncate(root / "b" / "b2.png")
    return r"b2\.png: cannot decode \(.*[Tt]runcated"


def _bad_trunc_jpeg(root):
    p = save(root / "b" / "b2.jpg", smooth(60, 80))
    _truncate(p)
    return r"b2\.jpg: cannot decode \(.*[Tt]runcated"


def _bad_gif_renamed(root):
    Image.new("RGB", (40, 30)).save(root / "a" / "a3.png", "GIF")
    return r"a3\.png: image format GIF is not allowed \(allowed: PNG, JPEG, BMP, TIFF, WEBP\)"


def _bad_gif_ext(root):
    Image.new("RGB", (40, 30)).save(root / "a" / "zz.gif")
    return r"zz\.gif: image format GIF is not allowed"


def _bad_bomb(root):
    save(root / "b" / "b0.png", smooth(100, 100))  # 10000 pixels; the others have 1200
    return r"b0\.png: (100x100 pixels is )?larger than Pillow's decompression-bomb limit"


@pytest.mark.parametrize(
    "spoil", [_bad_png_text, _bad_trunc_png, _bad_trunc_jpeg, _bad_gif_renamed, _bad_gif_ext, _bad_bomb]
)
def test_bad_image_aborts_with_one_line_and_writes_nothing(tmp_path, monkeypatch, spoil):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    src = make_folder(tmp_path / "if")
    pattern = spoil(src)
    with pytest.raises(UserError, match=pattern) as e:
        prep("imagefolder", src)
    msg = str(e.value)
    assert "\n" not in msg and "--skip-bad" in msg
    assert not (OUT / "d").exists() and not any(OUT.glob(".d*"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def _csv(src, text):
    (src / "train.csv").write_text(text)


@pytest.mark.parametrize(
    "spoil, pattern",
    [
        (
            lambda s: (s / "train_images/id01.png").unlink(),
            r"train\.csv row 3 \(id_code 'id01'\): image .*id01\.png not found",
        ),
        (
            lambda s: _csv(s, "id_code,diagnosis\nid00,0\nid01,5\n"),
            r"train\.csv row 3 \(id_code 'id01'\): diagnosis '5' is not a grade 0-4",
        ),
        (lambda s: _csv(s, "id_code,diagnosis\nid00,0\nid01,x\n"), r"row 3 \(id_code 'id01'\): diagnosis 'x'"),
        (
            lambda s: _csv(s, "id_code,diagnosis\nid00,0\nid01,1\nid00,2\n"),
            r"train\.csv row 4 \(id_code 'id00'\): duplicate id_code, first seen in row 2",
        ),
        (
            lambda s: _csv(s, "id,diagnosis\nid00,0\n"),
            r"train\.csv: missing column\(s\) id_code \(header is id,diagnosis\)",
        ),
        (lambda s: (s / "train.csv").unlink(), r"train\.csv: not found; the APTOS layout"),
        (lambda s: _csv(s, "id_code,diagnosis\n"), r"train\.csv: has no data rows"),
        (
            lambda s: (s / "train_images/id02.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"),
            r"train\.csv row 4 \(id_code 'id02'\): .*id02\.png: ",
        ),
    ],
)
def test_bad_aptos_input_names_row_and_writes_nothing(tmp_path, spoil, pattern):
    src = make_aptos(tmp_path / "aptos")
    spoil(src)
    with pytest.raises(UserError, match=pattern) as e:
        prep("aptos", src)
    assert "\n" not in str(e.value)
    assert not (OUT / "d").exists() and not any(OUT.glob(".d*"))


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from dpcam.cli import app

    src = make_folder(tmp_path / "if")
    _truncate(src / "a" / "a0.png")
    r = CliRunner().invoke(
        app, ["prepare", "--format", "imagefolder", "--source", str(src), "--dataset", "d", "--workers", "1"]
    )
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "a0.png: cannot decode" in lines[0]
    assert not (OUT / "d").exists()


# -------------------------------------------------------------------------------------- skip-bad


def test_skip_bad_records_and_compacts(tmp_path, caplog):
    src = make_aptos(tmp_path / "aptos")
    (src / "train_images/id01.png").unlink()  # missing image for a row
    _truncate(src / "train_images/id04.png")
    (src / "train_images/id07.png").write_text("text")
    with caplog.at_level(logging.WARNING):
        prep("aptos", src, size=16, skip_bad=True)
    assert "skipped 3 of 10 images" in caplog.text
    ds = store.load_dataset(OUT / "d")
    kept = [0, 2, 3, 5, 6, 8, 9]
    assert ds.images.shape == (7, 16, 16, 3)
    assert ds.labels.tolist() == [i % 5 for i in kept]
    for j, i in enumerate(kept):
        np.testing.assert_array_equal(ds.images[j], load_image(src / f"train_images/id{i:02d}.png", 16, True))
    m = manifest()
    assert m["count"] == 7 and m["source"]["files"] == 10
    assert [Path(s["file"]).name for s in m["skipped"]] == ["id01.png", "id04.png", "id07.png"]
    assert "row 3" in m["skipped"][0]["reason"] and "truncated" in m["skipped"][1]["reason"]
    assert sorted(p.name for p in OUT.iterdir()) == ["d"], "both temporary folders are gone"


def test_skip_bad_with_everything_bad_is_an_error(tmp_path):
    src = make_folder(tmp_path / "if", per_class=1)
    for p in src.rglob("*.png"):
        p.write_text("nope")
    with pytest.raises(UserError, match=r"all 2 images are bad"):
        prep("imagefolder", src, skip_bad=True)
    assert not (OUT / "d").exists() and not any(OUT.glob(".d*"))


def test_skip_bad_does_not_skip_structural_errors(tmp_path):
    src = make_aptos(tmp_path / "aptos")
    _csv(src, "id_code,diagnosis\nid00,0\nid00,1\n")
    with pytest.raises(UserError, match="duplicate id_code"):
        prep("aptos", src, skip_bad=True)


@pytest.mark.parametrize("threads, method", [(1, "fork"), (2, "forkserver")])
def test_two_workers_give_the_same_bytes_as_one(tmp_path, monkeypatch, threads, method):
    monkeypatch.setattr(sources.threading, "active_count", lambda: threads)
    assert sources._mp_context().get_start_method() == method
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # workers must inherit the parent's limit
    src = make_folder(tmp_path / "if", per_class=12)
    save(src / "a" / "a5.png", smooth(100, 100))  # over the limit: skipped
    save(src / "b" / "b3.jpg", smooth(30, 40, seed=3))
    _truncate(src / "b" / "b7.png")
    save(tmp_path / "masks/a2.png", np.eye(30, 40, dtype=np.uint8))
    prep("imagefolder", src, dataset="one", workers=1, skip_bad=True, size=16, masks=tmp_path / "masks")
    prep("imagefolder", src, dataset="two", workers=2, skip_bad=True, size=16, masks=tmp_path / "masks")
    for f in ["images.npy", "labels.npy", "masks.npy", "splits.npz"]:
        assert (OUT / "one" / f).read_bytes() == (OUT / "two" / f).read_bytes(), f
    m = manifest("two")
    assert [Path(s["file"]).name for s in m["skipped"]] == ["a5.png", "b7.png"] and m["count"] == 23
    assert m["masks"] == 1


_real_work = sources._work


def _crash_on_b1(task):
    """A worker task that dies on b1.png, as a segfaulting decoder would (module level: picklable)."""
    if task[0].name == "b1.png":
        sources.os._exit(1)
    return _real_work(task)


def test_dead_worker_is_one_error_line_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.threading, "active_count", lambda: 1)  # fork: workers see the patch below
    monkeypatch.setattr(sources, "_work", _crash_on_b1)
    src = make_folder(tmp_path / "if", per_class=8)
    with pytest.raises(UserError, match=r"a decoding process died .*; rerun with --workers 1"):
        prep("imagefolder", src, workers=2)
    assert not (OUT / "d").exists() and not any(OUT.glob(".d*"))


def _bytes_name(folder: Path, name: bytes) -> Path:
    """``folder / name`` for a name that is not valid UTF-8 (decoded with surrogate escapes, as os.listdir does)."""
    path = folder / os.fsdecode(name)
    try:
        path.write_text("not an image")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not valid UTF-8")
    return path


def test_file_and_folder_names_that_are_not_utf8_are_recorded_escaped(tmp_path):
    """Failed before: UnicodeEncodeError writing manifest.json after decoding everything (a traceback)."""
    src = make_folder(tmp_path / "if", classes=("a", "b"), per_class=3)
    _bytes_name(src / "a", b"bad\xff.png")
    (src / os.fsdecode(b"c\xfe")).mkdir()
    for i in range(3):
        save(src / os.fsdecode(b"c\xfe") / f"c{i}.png", seed=40 + i)
    prep("imagefolder", src, skip_bad=True)
    m = json.loads((OUT / "d" / "manifest.json").read_text(encoding="utf-8"))
    assert [s["file"] for s in m["skipped"]] == [f"{src}/a/bad\\xff.png"]
    assert m["classes"] == ["a", "b", "c\\xfe"] and m["count"] == 9
    assert sorted(p.name for p in OUT.iterdir()) == ["d"]


def test_a_bad_file_whose_name_is_not_utf8_is_one_printable_line(tmp_path):
    from typer.testing import CliRunner

    from dpcam.cli import app

    src = make_folder(tmp_path / "if")
    _bytes_name(src / "b", b"z\xff.png")
    r = CliRunner().invoke(
        app, ["prepare", "--format", "imagefolder", "--source", str(src), "--dataset", "d", "--workers", "1"]
    )
    assert r.exit_code == 2, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert "z\\xff.png: not an image" in line and "--skip-bad" in line
    assert not (OUT / "d").exists()


# ------------------------------------------------------------------------------------------ patients (groups)


def _groups_csv(path, rows):
    path.write_text("image,group\n" + "".join(f"{i},{g}\n" for i, g in rows), encoding="utf-8")
    return path


def test_groups_keep_each_patients_images_in_one_split_and_are_stored(tmp_path):
    src = make_aptos(tmp_path / "aptos", labels=tuple(i % 5 for i in range(20)))
    rows = [(f"id{i:02d}", f"p{i // 2}") for i in range(20)]  # ten patients, two eyes each
    prep("aptos", src, size=16, groups=_groups_csv(tmp_path / "patients.csv", rows))
    data = store.load_dataset(OUT / "d")
    assert data.groups is not None and data.groups.shape == (20,)
    where = {}
    for name, idx in data.splits.items():
        for g in data.groups[idx]:
            assert where.setdefault(int(g), name) == name  # no patient in two splits
    assert sorted(np.concatenate(list(data.splits.values()))) == list(range(20))
    m = manifest()["groups"]
    assert (m["count"], m["largest"], m["names"][:2]) == (10, 2, ["p0", "p1"])
    assert "groups.npy" in manifest()["checksums"]


@pytest.mark.parametrize(
    "rows, words",
    [
        ([("id00", "p0")], "no group for image id01"),
        ([("id00", "p0"), ("id01", "")], "row 3 has an empty group"),
        ([("id00", "p0"), ("id00", "p1")], "row 3 lists image 'id00' again"),
    ],
)
def test_a_bad_groups_file_is_one_line_before_anything_is_written(tmp_path, rows, words):
    src = make_aptos(tmp_path / "aptos", labels=(0, 1))
    with pytest.raises(UserError, match=f"^prepare.groups .*patients.csv: .*{words}"):
        prep("aptos", src, size=16, groups=_groups_csv(tmp_path / "patients.csv", rows))
    assert not (OUT / "d").exists()
    (tmp_path / "other.csv").write_text("id_code,patient\nid00,p0\n")
    with pytest.raises(UserError, match="needs the columns image and group"):
        prep("aptos", src, size=16, groups=tmp_path / "other.csv")
