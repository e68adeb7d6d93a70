import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dpcam.config import PrepareConfig
from dpcam.data import sources, store
from dpcam.errors import UserError

OUT = Path("data/prepared")


def smooth(h=30, w=40, seed=0):
    """Smooth random RGB uint8 (h, w, 3): resized noise, so JPEG and resampling behave like photos."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(30, 256, (4, 4, 3), dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def save(path, arr=None, seed=0, fmt=None, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth(seed=seed) if arr is None else arr).save(path, fmt, **kw)
    return path


def fundus(h=30, w=40, seed=0):
    """Bright retina-like content on a black border of 5 px left/right and 3 px top/bottom."""
    a = np.zeros((h, w, 3), np.uint8)
    a[3 : h - 3, 5 : w - 5] = smooth(h - 6, w - 10, seed)
    return a


def make_aptos(root, labels=(0, 1, 2, 3, 4, 0, 1, 2, 3, 4), bom=False):
    root = Path(root)
    lines = ["id_code,diagnosis"]
    for i, y in enumerate(labels):
        save(root / "train_images" / f"id{i:02d}.png", fundus(seed=i))
        lines.append(f"id{i:02d},{y}")
    (root / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig" if bom else "utf-8")
    return root


def make_folder(root, classes=("a", "b"), per_class=4, ext="png"):
    root = Path(root)
    for c, name in enumerate(classes):
        for i in range(per_class):
            save(root / name / f"{name}{i}.{ext}", seed=10 * c + i)
    return root


def cfg(fmt, source, **kw):
    kw.setdefault("dataset", "d")
    kw.setdefault("workers", 1)
    return PrepareConfig(format=fmt, source=source, **kw)


def prep(fmt, source, **kw):
    return sources.prepare_source(cfg(fmt, source, **kw), progress=False)


def manifest(name="d"):
    return json.loads((OUT / name / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------ layouts


def test_layouts_list_labels_and_classes(tmp_path):
    items, classes = sources.list_items("aptos", make_aptos(tmp_path / "aptos", labels=(3, 0, 4)))
    assert classes[0].startswith("0") and len(classes) == 5
    assert [(p.name, y) for p, y in items] == [("id00.png", 3), ("id01.png", 0), ("id02.png", 4)]

    for root, folder in [(tmp_path / "cd1", tmp_path / "cd1" / "train"), (tmp_path / "cd2", tmp_path / "cd2")]:
        for name in ["dog.10.jpg", "cat.2.jpg", "cat.10.jpg", "dog.1.jpg"]:
            save(folder / name)
        (folder / "Thumbs.db").write_bytes(b"\0")  # non-image files are ignored
        items, classes = sources.list_items("catsdogs", root)
        assert classes == ["cat", "dog"]
        assert [(p.name, y) for p, y in items] == [
            ("cat.2.jpg", 0),
            ("cat.10.jpg", 0),
            ("dog.1.jpg", 1),
            ("dog.10.jpg", 1),
        ]

    for root, base in [(tmp_path / "pet1", tmp_path / "pet1"), (tmp_path / "pet2", tmp_path / "pet2" / "PetImages")]:
        save(base / "Cat" / "1.jpg")
        save(base / "Dog" / "1.jpg")
        save(base / "Dog" / "0.jpg")
        items, classes = sources.list_items("petimages", root)
        assert classes == ["cat", "dog"] and [y for _, y in items] == [0, 1, 1]

    root = make_folder(tmp_path / "if", classes=("zebra", "ant", "mole"), per_class=2)
    save(root / "ant" / "nested" / "deep.png")
    items, classes = sources.list_items("imagefolder", root)
    assert classes == ["ant", "mole", "zebra"]
    assert [y for _, y in items] == [0, 0, 0, 1, 1, 2, 2]


def test_prepare_aptos_writes_dataset_and_manifest(tmp_path):
    src = make_aptos(tmp_path / "aptos")
    out = prep("aptos", src, size=16, split={"train": 0.6, "val": 0.2, "test": 0.2})
    assert out == OUT / "d"
    ds = store.load_dataset(out)
    assert ds.images.shape == (10, 16, 16, 3) and ds.images.dtype == np.uint8 and ds.masks is None
    assert ds.labels.tolist() == [0, 1, 2, 3, 4] * 2
    np.testing.assert_array_equal(ds.images[3], sources.load_image(src / "train_images/id03.png", 16, fundus=True))
    m = manifest()
    assert m["kind"] == "prepared" and m["dataset"] == "d"
    assert m["source"] == {"format": "aptos", "path": str(src), "files": 10}
    assert m["classes"] == sources.APTOS_CLASSES and m["image_size"] == 16 and m["seed"] == 0
    assert m["split_fractions"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert "fundus" in m["preprocessing"] and m["skipped"] == [] and m["masks"] is None
    assert sum(s["count"] for s in m["splits"].values()) == 10
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_utf8_bom_csv_and_spaced_header_work(tmp_path):
    src = make_aptos(tmp_path / "aptos", labels=(2, 1), bom=True)
    assert (src / "train.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    items, _ = sources.list_items("aptos", src)
    assert [y for _, y in items] == [2, 1]
    (src / "train.csv").write_text("\ufeff id_code , diagnosis \nid00, 4\nid01,0\n", encoding="utf-8")
    assert [y for _, y in sources.list_items("aptos", src)[0]] == [4, 0]


# ------------------------------------------------------------------------------------ preprocessing


def test_fundus_crop_removes_border_and_pads_to_square(tmp_path):
    a = np.zeros((60, 100, 3), np.uint8)
    a[20:40, 30:70] = (200, 120, 60)  # a 40x20 "retina" on black, off-centre
    p = save(tmp_path / "f.png", a)
    x = sources.load_image(p, 16, fundus=True)
    assert x.shape == (16, 16, 3) and x.dtype == np.uint8
    # the retina box fills the width; the height is padded with black above and below (4 rows each)
    assert np.abs(x[7:9, 3:13].astype(int) - (200, 120, 60)).max() <= 1
    assert x[0].max() == 0 and x[-1].max() == 0 and x[4:12].min() > 0
    # without fundus preprocessing: centre 60x60 square, the retina covers only the middle
    y = sources.load_image(p, 15)
    assert y[:, 0].max() < 20 and np.abs(y[7, 7].astype(int) - (200, 120, 60)).max() <= 4


def test_nonsquare_centre_crop_and_rgb(tmp_path):
    a = np.zeros((30, 40), np.uint8)
    a[:, :5] = 255  # left 5 columns fall outside the centre 30x30 square
    a[:, 35:] = 255
    x = sources.load_image(save(tmp_path / "g.png", a), 30)
    assert x.shape == (30, 30, 3) and x.max() == 0


def test_big_jpeg_draft_and_mask_stay_aligned(tmp_path):
    img = np.zeros((600, 800, 3), np.uint8)
    img[:, :400] = 255
    p = save(tmp_path / "if/a/big.jpg", img, quality=95)
    save(tmp_path / "if/b/other.png")
    mask = np.zeros((600, 800), np.uint8)
    mask[:, :400] = 255
    save(tmp_path / "masks/big.png", mask)
    full = np.asarray(Image.open(p).convert("RGB").crop((100, 0, 700, 600)).resize((32, 32), Image.Resampling.LANCZOS))
    x = sources.load_image(p, 32)
    assert np.abs(x.astype(int) - full).mean() < 2
    prep("imagefolder", tmp_path / "if", size=32, masks=tmp_path / "masks")
    ds = store.load_dataset(OUT / "d")
    expect = np.zeros((32, 32), np.uint8)
    expect[:, :16] = 1
    np.testing.assert_array_equal(ds.masks[0], expect)
    assert (x[:, :15] > 200).all() and (x[:, 17:] < 50).all()


def test_16_bit_grey_keeps_its_top_8_bits(tmp_path):
    a = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    x = sources.load_image(p, 30)
    np.testing.assert_array_equal(x[..., 0], (a[:, 5:35] >> 8).astype(np.uint8))
    assert (x[..., 0] == x[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    a = smooth(30, 30)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    p = save(tmp_path / "r.png", a, exif=exif)
    np.testing.assert_array_equal(sources.load_image(p, 30), a[::-1, ::-1])
    # 90 degrees: a 40x30 file shown as 30x40; its mask is drawn on the image as shown
    b = smooth(30, 40, seed=1)
    exif[0x0112] = 6
    save(tmp_path / "if/a/q.png", b, exif=exif)
    save(tmp_path / "if/b/o.png")
    m = np.zeros((40, 30), np.uint8)
    m[:20] = 1
    save(tmp_path / "masks/q.png", m)
    prep("imagefolder", tmp_path / "if", size=30, masks=tmp_path / "masks")
    ds = store.load_dataset(OUT / "d")
    np.testing.assert_array_equal(ds.images[0], np.rot90(b, k=-1)[5:35])
    np.testing.assert_array_equal(ds.masks[0], m[5:35])


def test_masks_folder_binary_nearest_and_missing_masks_zero(tmp_path):
    src = make_folder(tmp_path / "if", per_class=2)
    m = np.zeros((30, 40), np.uint8)
    m[:15] = 1  # a 0/1 mask: top half
    save(tmp_path / "masks/a0.png", m)
    m2 = np.zeros((30, 40), np.uint8)
    m2[:, 20:] = 255  # a 0/255 mask: right half (of the centre 30x30: columns 15..29)
    save(tmp_path / "masks/b1.bmp", m2)
    prep("imagefolder", src, size=16, masks=tmp_path / "masks")
    ds = store.load_dataset(OUT / "d")
    assert ds.masks.shape == (4, 16, 16) and set(np.unique(ds.masks)) <= {0, 1}
    assert ds.masks[0][:8].all() and not ds.masks[0][8:].any()
    assert ds.masks[3][:, 8:].all() and not ds.masks[3][:, :8].any()
    assert not ds.masks[1].any() and not ds.masks[2].any()
    assert manifest()["masks"] == 2


def test_mask_of_other_size_is_a_bad_file(tmp_path):
    src = make_folder(tmp_path / "if", per_class=1)
    save(tmp_path / "masks/a0.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(UserError, match=r"a0\.png: mask is 10x10 but its image a0.png is 40x30"):
        prep("imagefolder", src, masks=tmp_path / "masks")
    assert not (OUT / "d").exists()


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


def test_structural_errors_of_folders(tmp_path):
    src = make_folder(tmp_path / "if")
    (src / "c").mkdir()
    (src / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"if/c: class folder has no images"):
        prep("imagefolder", src)
    with pytest.raises(UserError, match=r"'.*nowhere' does not exist"):
        sources.list_items("imagefolder", tmp_path / "nowhere")
    c = PrepareConfig.model_construct(**{**cfg("imagefolder", src).__dict__, "source": tmp_path / "nowhere"})
    with pytest.raises(UserError, match=r"does not exist"):
        sources.prepare_source(c, progress=False)
    save(tmp_path / "cd/train/cat.1.jpg")
    with pytest.raises(UserError, match=r"no dog\.\*\.jpg images"):
        sources.list_items("catsdogs", tmp_path / "cd")
    save(tmp_path / "cd/train/dog.1.jpg")
    save(tmp_path / "cd/train/horse.1.jpg")
    with pytest.raises(UserError, match=r"horse\.1\.jpg: cannot tell cat from dog"):
        sources.list_items("catsdogs", tmp_path / "cd")
    save(tmp_path / "pet/Cat/1.jpg")
    with pytest.raises(UserError, match=r"no Dog/ folder"):
        sources.list_items("petimages", tmp_path / "pet")
    assert not OUT.exists()


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
        np.testing.assert_array_equal(ds.images[j], sources.load_image(src / f"train_images/id{i:02d}.png", 16, True))
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
