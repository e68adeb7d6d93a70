import os
from pathlib import Path

import pytest

from dpcam import layout
from dpcam.errors import UserError


def test_run_names_say_what_a_run_varies():
    assert layout.run_name("none", "smallcnn", 0) == "none-epsinf-smallcnn-s0"
    assert layout.run_name("gaussian", "smallcnn", 1, epsilon=0.5) == "gaussian-eps0.5-smallcnn-s1"
    assert layout.run_name("gaussian", "m", 0, epsilon=1, clip=0.1) == "gaussian-eps1-clip0.1-m-s0"
    assert layout.run_name("none", "m", 0, train_size=2000) == "none-epsinf-n2000-m-s0"
    assert layout.run_name("ldp", "m", 2, ldp="dp-pix-eps1") == "ldp-dp-pix-eps1-m-s2"


def test_write_atomic_leaves_the_old_file_when_writing_fails():
    path = Path("out/a.json")
    layout.write_json(path, {"v": 1})

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        layout.write_atomic(path, boom)
    assert path.read_text() == '{\n  "v": 1\n}\n' and os.listdir("out") == ["a.json"]


def test_staged_dir_replaces_a_folder_whole_or_not_at_all():
    out = Path("reports")
    with layout.staged_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(RuntimeError), layout.staged_dir(out) as tmp:
        (tmp / "y").write_text("2")
        raise RuntimeError
    assert sorted(os.listdir(".")) == ["reports"] and os.listdir(out) == ["x"]


def test_run_folders_are_found_in_their_family():
    (layout.MODELS_ROOT / "gaussian" / "r").mkdir(parents=True)
    (layout.MODELS_ROOT / "gaussian" / "r" / "model.json").write_text("{}")
    assert layout.run_dir("r") == Path("models/gaussian/r") and layout.is_trained("r")
    assert layout.resolve_run("r") == "r"
    with pytest.raises(UserError, match="unknown run 'q'.*trained runs: r"):
        layout.resolve_run("q")
