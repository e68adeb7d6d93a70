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


@pytest.mark.parametrize("name", ["../models/r", "/abs/models/r", "..", ".", "a/b", "", ".hidden", "r\nx"])
def test_run_names_are_names_not_paths(name):
    """A path would put outputs outside metrics/ or audits/ (e.g. into another run's model folder)."""
    for find in (layout.run_dir, layout.metrics_dir, layout.audit_dir, layout.resolve_run):
        with pytest.raises(UserError, match="is not a run name") as e:
            find(name)
        assert "\n" not in str(e.value)
    assert layout.is_name("gaussian-eps0.5-smallcnn-s0") and not layout.is_name(name)


@pytest.mark.parametrize("run", ["../models/r", "ABS"])
def test_explain_and_audit_refuse_a_path_for_a_run(run):
    """Failed before: `dpcam explain ../models/r` found models/../models/r and wrote metrics/../models/r, i.e.
    into the run's model folder (an absolute path likewise anywhere)."""
    from typer.testing import CliRunner

    from dpcam.cli import app

    (layout.MODELS_ROOT / "r").mkdir(parents=True)
    (layout.MODELS_ROOT / "r" / "model.json").write_text("{}")
    run = str(Path("models/r").resolve()) if run == "ABS" else run
    before = sorted(os.listdir("models/r"))
    for command in (["explain", run, "--device", "cpu"], ["audit", run, "--device", "cpu"]):
        res = CliRunner().invoke(app, command)
        assert res.exit_code == 2, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is not a run name" in errors[0] and "not a path" in errors[0], res.output
    assert sorted(os.listdir("models/r")) == before and not Path("metrics").exists() and not Path("audits").exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_writer_removes_the_temporary_folders_dead_processes_left():
    """kill -9 during a write leaves .NAME.tmp-<pid>-<host>-XXXX (dataset-sized for prepare); the next writer of
    NAME removes those of dead pids on this machine, and nothing that a live process or another machine owns."""
    host = layout._host_tag()
    root = Path("data/prepared")
    dead, live = _dead_pid(), os.getppid()
    stale = root / f".d.tmp-{dead}-{host}-abc_1234"
    stale_file = root / f".d.tmp-{dead}-{host}.json"
    stale_old = root / f".d.old-{dead}-{host}"
    keep = [
        root / f".d.tmp-{live}-{host}-abcd1234",  # a live writer
        root / f".d.tmp-{dead}-otherhost-abcd1234",  # another machine's: its pid cannot be checked here
        root / f".dx.tmp-{dead}-{host}-abcd1234",  # another target
        root / ".d.tmp-abcd1234",  # named before owners were recorded
    ]
    for folder in (stale, stale_old, *keep):
        folder.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"x" * 1000)
    stale_file.write_text("{}")
    tmp = layout.temp_dir(root / "d")
    assert tmp.name.startswith(f".d.tmp-{os.getpid()}-{host}-")
    assert not stale.exists() and not stale_file.exists() and not stale_old.exists()
    assert all(folder.is_dir() for folder in keep)
    layout.write_json(root / "d.json", {})  # a file's writer does the same for its temporary siblings
    (root / f".d.json.tmp-{dead}-{host}.json").write_text("half")
    layout.write_json(root / "d.json", {})
    assert not (root / f".d.json.tmp-{dead}-{host}.json").exists()


def test_saved_weights_are_the_same_bytes_whatever_the_file_and_process(tmp_path):
    """torch names a zip archive after the path it is saved to: the temporary file's pid must not reach the bytes."""
    import torch

    from dpcam.layout import save_torch

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    a = save_torch(state, tmp_path / "a" / "model.pt")
    b = save_torch(state, tmp_path / "b" / "a-much-longer-file-name.pt")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(b, weights_only=True)["w"], state["w"])


# ------------------------------------------------------------------------------------ issue 25: a full disk


def _full(errno_: int):
    def write(path):
        Path(path).write_bytes(b"half")
        raise OSError(errno_, os.strerror(errno_))

    return write


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file():
    """Issue 25, case 5: a full disk (ENOSPC) or the file-size limit (EFBIG, `ulimit -f`) was a traceback."""
    import errno

    for code, words in (
        (errno.ENOSPC, "cannot write, no space left on the device, "),
        (errno.EFBIG, "file too large "),
    ):
        with pytest.raises(UserError) as err:
            layout.write_atomic(Path("out/x.json"), _full(code))
        assert str(err.value).startswith(f"out/x.json: {words}") and "\n" not in str(err.value)
        assert list(Path("out").iterdir()) == []
    with pytest.raises(OSError, match="Permission"):  # any other error is not a full disk
        layout.write_atomic(Path("out/x.json"), _full(errno.EACCES))


def test_a_full_disk_inside_a_staged_folder_names_the_folder_and_leaves_no_temporary_folder():
    import errno

    with pytest.raises(UserError, match=r"^reports/search: cannot write, no space left on the device"):
        with layout.staged_dir(Path("reports/search")) as tmp:
            _full(errno.ENOSPC)(tmp / "front.csv")
    assert list(Path("reports").iterdir()) == []
    assert layout.disk_full(OSError(errno.EIO, "I/O error"), "x") is None
    need = str(layout.disk_full(OSError(errno.EDQUOT, "quota"), "x", need=5_000_000))
    assert need.startswith("x: cannot write, disk quota exceeded; it needs about 5.0 MB")
