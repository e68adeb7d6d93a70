import pytest

from dpcam.config import PrepareConfig
from dpcam.data import sources
from dpcam.data.readers import list_items
from dpcam.errors import UserError
from tests.data.source_helpers import OUT, cfg, make_aptos, make_folder, prep, save

# ------------------------------------------------------------------------------------------ layouts


def test_layouts_list_labels_and_classes(tmp_path):
    items, classes = list_items("aptos", make_aptos(tmp_path / "aptos", labels=(3, 0, 4)))
    assert classes[0].startswith("0") and len(classes) == 5
    assert [(p.name, y) for p, y in items] == [("id00.png", 3), ("id01.png", 0), ("id02.png", 4)]

    for root, folder in [(tmp_path / "cd1", tmp_path / "cd1" / "train"), (tmp_path / "cd2", tmp_path / "cd2")]:
        for name in ["dog.10.jpg", "cat.2.jpg", "cat.10.jpg", "dog.1.jpg"]:
            save(folder / name)
        (folder / "Thumbs.db").write_bytes(b"\0")  # non-image files are ignored
        items, classes = list_items("catsdogs", root)
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
        items, classes = list_items("petimages", root)
        assert classes == ["cat", "dog"] and [y for _, y in items] == [0, 1, 1]

    root = make_folder(tmp_path / "if", classes=("zebra", "ant", "mole"), per_class=2)
    save(root / "ant" / "nested" / "deep.png")
    items, classes = list_items("imagefolder", root)
    assert classes == ["ant", "mole", "zebra"]
    assert [y for _, y in items] == [0, 0, 0, 1, 1, 2, 2]


def test_utf8_bom_csv_and_spaced_header_work(tmp_path):
    src = make_aptos(tmp_path / "aptos", labels=(2, 1), bom=True)
    assert (src / "train.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    items, _ = list_items("aptos", src)
    assert [y for _, y in items] == [2, 1]
    (src / "train.csv").write_text("\ufeff id_code , diagnosis \nid00, 4\nid01,0\n", encoding="utf-8")
    assert [y for _, y in list_items("aptos", src)[0]] == [4, 0]


def test_structural_errors_of_folders(tmp_path):
    src = make_folder(tmp_path / "if")
    (src / "c").mkdir()
    (src / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"if/c: class folder has no images"):
        prep("imagefolder", src)
    with pytest.raises(UserError, match=r"'.*nowhere' does not exist"):
        list_items("imagefolder", tmp_path / "nowhere")
    c = PrepareConfig.model_construct(**{**cfg("imagefolder", src).__dict__, "source": tmp_path / "nowhere"})
    with pytest.raises(UserError, match=r"does not exist"):
        sources.prepare_source(c, progress=False)
    save(tmp_path / "cd/train/cat.1.jpg")
    with pytest.raises(UserError, match=r"no dog\.\*\.jpg images"):
        list_items("catsdogs", tmp_path / "cd")
    save(tmp_path / "cd/train/dog.1.jpg")
    save(tmp_path / "cd/train/horse.1.jpg")
    with pytest.raises(UserError, match=r"horse\.1\.jpg: cannot tell cat from dog"):
        list_items("catsdogs", tmp_path / "cd")
    save(tmp_path / "pet/Cat/1.jpg")
    with pytest.raises(UserError, match=r"no Dog/ folder"):
        list_items("petimages", tmp_path / "pet")
    assert not OUT.exists()
