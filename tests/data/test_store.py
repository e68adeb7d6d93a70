import json

import numpy as np
import pytest
import torch

from dpcam.data import store
from dpcam.errors import UserError
from tests.conftest import make_tiny


def write_tiny(path, n=20, size=8, masks=True):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    splits = store.stratified_split(labels, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    with store.DatasetWriter(path, n, size, size, with_masks=masks) as w:
        w.images[:] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        if masks:
            w.masks[:] = rng.integers(0, 2, (n, size, size), dtype=np.uint8)
        w.finish(labels, splits, {"dataset": "tiny", "classes": ["a", "b"]})
    return store.load_dataset(path)


def test_round_trip_and_manifest(tmp_path):
    ds = write_tiny(tmp_path / "tiny")
    assert isinstance(ds.images, np.memmap) and ds.images.shape == (20, 8, 8, 3)
    m = json.loads((tmp_path / "tiny/manifest.json").read_text())
    assert m["count"] == 20 and m["splits"]["train"]["per_class"] == {"a": 6, "b": 6}
    assert set(m["checksums"]) == {"images.npy", "labels.npy", "splits.npz", "masks.npy"}
    assert m["checksums"]["images.npy"] == store.file_sha256(tmp_path / "tiny/images.npy")
    assert not list(tmp_path.glob(".tiny*")), "temporary folders are cleaned up"


def test_stratified_split_is_disjoint_complete_and_seeded():
    labels = np.repeat(np.arange(5), [50, 10, 27, 5, 8])
    fr = {"train": 0.7, "val": 0.1, "test": 0.2}
    a = store.stratified_split(labels, fr, seed=3)
    b = store.stratified_split(labels, fr, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    allidx = np.concatenate(list(a.values()))
    assert np.array_equal(np.sort(allidx), np.arange(labels.size))
    for c, count in enumerate([50, 10, 27, 5, 8]):
        assert abs((labels[a["train"]] == c).sum() - 0.7 * count) <= 1
    assert not np.array_equal(a["test"], store.stratified_split(labels, fr, seed=4)["test"])


def test_failed_write_leaves_nothing_and_keeps_old(tmp_path):
    write_tiny(tmp_path / "tiny")
    before = (tmp_path / "tiny/images.npy").read_bytes()
    with pytest.raises(RuntimeError):
        with store.DatasetWriter(tmp_path / "tiny", 5, 8, 8, with_masks=False) as w:
            w.images[:] = 7
            raise RuntimeError("killed")
    assert (tmp_path / "tiny/images.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_torch_dataset_batches_in_pixel_space(tmp_path):
    ds = write_tiny(tmp_path / "tiny")
    train = ds.split("train", with_masks=True)
    x, y, m = train[3]
    i = train.indices[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(np.array(ds.images[i])).permute(2, 0, 1).float() / 255)
    assert int(y) == ds.labels[i] and m.shape == (8, 8)
    xb, yb = next(iter(ds.split("test").loader(batch_size=3)))
    assert xb.shape == (3, 3, 8, 8)
    assert torch.equal(yb, torch.from_numpy(ds.labels[ds.splits["test"][:3]]))


def test_reading_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset.*dpcam prepare"):
        store.load_dataset(tmp_path / "nothing")
    ds = write_tiny(tmp_path / "nomask", masks=False)
    with pytest.raises(UserError, match="no lesion masks"):
        ds.split("train", with_masks=True)


def test_poisson_loader_handles_empty_and_varying_batches(tmp_path):
    from opacus.data_loader import DPDataLoader

    ds = write_tiny(tmp_path / "tiny", n=40)
    loader = DPDataLoader.from_data_loader(
        ds.split("train").loader(batch_size=2), generator=torch.Generator().manual_seed(0)
    )
    sizes = [xb.shape[0] for xb, yb in loader for _ in range(1)]
    assert all(xb.ndim == 4 for xb, _ in loader)
    assert len(set(sizes)) > 1


def test_batches_give_exact_per_example_gradients_under_opacus_hooks(tmp_path):
    """Regression: a channels-last view made Opacus's hooks compute wrong per-example conv gradients."""
    from opacus import GradSampleModule
    from torch.func import functional_call, grad, vmap

    from dpcam.models import create_model

    ds = write_tiny(tmp_path / "tiny", n=20, size=16, masks=False)
    x, y = ds.split("train").batch(range(6))
    assert x.is_contiguous()
    model = create_model("smallcnn", 2, 16, seed=0)
    plain = create_model("smallcnn", 2, 16, seed=0)  # the same weights, never hooked
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    params = {k: v.detach() for k, v in plain.named_parameters()}

    def loss_one(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(plain, p, (xi[None],)), yi[None], reduction="sum")

    expected = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad_sample, expected[name], atol=1e-5, rtol=1e-4), name


def test_subset_draws_distinct_images_of_the_split_reproducibly():
    ds = store.load_dataset(make_tiny(n=100))
    train = ds.split("train")
    a, b = train.subset(20, seed=0), train.subset(20, seed=0)
    assert len(a) == 20 and np.array_equal(a.indices, b.indices) and len(set(a.indices)) == 20
    assert set(a.indices) <= set(train.indices)
    with pytest.raises(UserError, match="cannot take 999 images"):
        train.subset(999)


def test_a_prepare_killed_with_sigkill_leaves_nothing_the_next_one_keeps(tmp_path):
    """kill -9 mid-write leaves the dataset-sized temporary folder; the next writer of the dataset removes it
    (failed before: .tiny.tmp-XXXX stayed for good, named without its owner)."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal; from dpcam.data import store; "
        "w = store.DatasetWriter('data/prepared/tiny', 50, 32, 32, with_masks=False); w.images[:] = 7; "
        "w.images.flush(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    root = tmp_path / "data/prepared"
    (left,) = root.glob(".tiny.tmp-*")
    assert (left / "images.npy").stat().st_size >= 50 * 32 * 32 * 3
    make_tiny()
    assert sorted(p.name for p in root.iterdir()) == ["tiny"]


# ------------------------------------------------------------------------- issue 25: a full disk, a run's data


def test_a_file_size_limit_while_preparing_is_one_line_and_leaves_no_temporary_folder():
    """Issue 25, case 5: under `ulimit -f`, `dpcam prepare` died with an `OSError [Errno 27] File too large`
    traceback and left data/prepared/.<name>.tmp-<pid>-*/ behind: the writer failed in its constructor, before
    its clean-up was armed."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = subprocess.run(
        [sys.executable, "-m", "dpcam", "prepare", "--n", "200", "--size", "32", "--workers", "1"],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: data/prepared/synthetic-fundus: file too large to write (the file-size limit of this process, "
        "`ulimit -f`, stops it; it needs about 0.8 MB); raise the limit (`ulimit -f unlimited`) and run the command "
        "again"
    ], out.stderr
    assert list(Path("data/prepared").iterdir()) == []  # neither the dataset nor a temporary folder


def test_a_full_disk_when_the_writer_starts_is_one_line_with_the_space_free_and_needed(tmp_path, monkeypatch):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", no_space)
    with pytest.raises(UserError) as err:
        store.DatasetWriter(tmp_path / "big", 1000, 64, 64, with_masks=True)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'big'}: cannot write, no space left on the device; it needs about 16.4 MB, ")
    assert "free; free some space and run the command again" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_a_run_and_its_data_stay_a_pair(tmp_path):
    """Issue 25, case 6: the data a run was trained on is recorded (train.json's data_fingerprint); other data in
    its folder is refused naming both, or with --allow-data-change noted."""
    path = make_tiny(root=tmp_path, size=16)
    recorded = store.fingerprint(store.load_dataset(path))
    assert recorded["image_size"] == 16 and recorded["images"] == 240 and len(recorded["manifest_sha256"]) == 64
    assert store.data_change("r", recorded, store.load_dataset(path), allow=False) is None
    assert store.data_change("r", None, store.load_dataset(path), allow=False) is None  # trained before records
    make_tiny(root=tmp_path, size=24)  # `dpcam prepare --size 24` over the same folder
    now = store.load_dataset(path)
    with pytest.raises(UserError) as err:
        store.data_change("r", recorded, now, allow=False)
    msg = str(err.value)
    assert msg.startswith(
        f"run r was trained on {path} as it was then (manifest sha256 {recorded['manifest_sha256'][:12]}"
    )
    assert ", 16 px, 240 images, seed none); it now holds other data (manifest sha256 " in msg
    assert ", 24 px, 240 images" in msg and msg.endswith(
        "or pass --allow-data-change to go on anyway (the record notes it)"
    )
    note = store.data_change("r", recorded, now, allow=True)
    assert note.startswith("data changed since training (--allow-data-change): run r was trained on ")


def test_a_grouped_split_puts_each_group_in_one_split_near_the_fractions_and_is_seeded():
    from dpcam.data.store import grouped_split

    groups = np.repeat(np.arange(100), 3)  # 100 patients, 3 images each
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    a, b = grouped_split(groups, fractions, 0), grouped_split(groups, fractions, 0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], grouped_split(groups, fractions, 1)["train"])
    assert sorted(np.concatenate(list(a.values()))) == list(range(300))
    assert (
        len(set(groups[a["train"]]) & set(groups[a["test"]])) == 0
        and len(set(groups[a["val"]]) & set(groups[a["test"]])) == 0
    )
    assert [len(a[k]) for k in ("train", "val", "test")] == [210, 30, 60]
