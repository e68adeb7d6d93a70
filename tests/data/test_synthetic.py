import numpy as np
import pytest

from dpcam.data import synthetic
from dpcam.data.synthetic_geometry import _draw_chunk
from dpcam.errors import UserError

N, SIZE = 50, 32


@pytest.fixture(scope="module")
def sample():
    return synthetic.generate(N, SIZE, seed=7, workers=1)


def test_shapes_dtypes_and_ranges(sample):
    images, labels, masks = sample
    assert images.shape == (N, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (N,) and labels.dtype == np.int64
    assert masks.shape == (N, SIZE, SIZE) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert np.array_equal(np.bincount(labels, minlength=5), [10] * 5)
    # a dark frame around a bright retina
    assert images[:, 0, 0].max() < 25 and images[:, SIZE // 2, SIZE // 2].mean() > 60
    assert len(synthetic.CLASSES) == synthetic.GRADES == 5


def test_same_seed_same_bytes_other_seed_differs(sample):
    images, labels, masks = sample
    again = synthetic.generate(N, SIZE, seed=7, workers=1)
    assert all(np.array_equal(a, b) for a, b in zip(sample, again))
    other = synthetic.generate(N, SIZE, seed=8, workers=1)
    assert not np.array_equal(images, other[0])
    assert not np.array_equal(labels, other[1])


def test_bytes_do_not_depend_on_workers_or_chunking(sample, monkeypatch):
    two = synthetic.generate(N, SIZE, seed=7, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(sample, two))
    monkeypatch.setattr(synthetic, "CHUNK", 7)
    rechunked = synthetic.generate(N, SIZE, seed=7, workers=1)
    assert all(np.array_equal(a, b) for a, b in zip(sample, rechunked))


def test_class_counts():
    assert synthetic.class_counts(10, "uniform").tolist() == [2, 2, 2, 2, 2]
    assert synthetic.class_counts(12, "uniform").tolist() == [3, 3, 2, 2, 2]  # remainders to lower grades
    aptos = synthetic.class_counts(1000, "aptos")
    assert aptos.sum() == 1000 and aptos.tolist() == [493, 101, 273, 53, 80]
    assert synthetic.class_counts(7, "aptos").sum() == 7
    assert synthetic.class_counts(10, [1, 0, 0, 0, 1]).tolist() == [5, 0, 0, 0, 5]
    assert synthetic.class_counts(9, [0.5, 0.25, 0.25, 0, 0]).tolist() == [5, 2, 2, 0, 0]
    for bad in ("skewed", [1, 2, 3], [1, -1, 1, 1, 1], [0, 0, 0, 0, 0]):
        with pytest.raises(UserError, match="balance"):
            synthetic.class_counts(10, bad)


def test_labels_follow_balance_and_are_shuffled():
    labels = synthetic.make_labels(200, "aptos", seed=1)
    assert np.bincount(labels, minlength=5).tolist() == synthetic.class_counts(200, "aptos").tolist()
    assert not np.all(np.diff(labels) >= 0), "labels are shuffled"


def test_masks_empty_for_grade_0_and_grow_with_grade(sample):
    images, labels, masks = sample
    area = masks.sum(axis=(1, 2))
    assert np.all(area[labels == 0] == 0)
    assert np.all(area[labels >= 1] > 0)
    mean = [area[labels == g].mean() for g in range(5)]
    assert all(a < b for a, b in zip(mean, mean[1:])), mean


def test_lesions_lie_inside_the_retina(sample):
    _, labels, masks = sample
    g = _draw_chunk(0, labels, SIZE, 7, 1.0).g
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(xx[None] - g["cx"][:, None, None], yy[None] - g["cy"][:, None, None])
    assert not np.any(masks.astype(bool) & (r > g["R"][:, None, None]))


def test_lesions_are_darker_red_or_brighter_than_the_background():
    images, labels, masks = synthetic.generate(20, 64, seed=3, balance=[0, 1, 0, 0, 0], workers=1)
    # grade 1 = microaneurysms only: lesion pixels are darker (green channel) than the retina
    m = masks.astype(bool)
    yy, xx = np.mgrid[0:64, 0:64]
    ring = (np.hypot(xx - 31.5, yy - 31.5) < 20)[None] & ~m
    assert images[..., 1][m].mean() < images[..., 1][np.broadcast_to(ring, m.shape)].mean() - 10


def test_lesion_scale_grows_lesions():
    small = synthetic.generate(20, 64, seed=2, balance=[0, 0, 1, 0, 0], lesion_scale=0.7, workers=1)[2]
    large = synthetic.generate(20, 64, seed=2, balance=[0, 0, 1, 0, 0], lesion_scale=1.5, workers=1)[2]
    assert large.sum() > 2 * small.sum()


def test_other_sizes():
    images, labels, masks = synthetic.generate(5, 224, seed=0, workers=1)
    assert images.shape == (5, 224, 224, 3) and masks.shape == (5, 224, 224)
    assert np.all(masks.sum(axis=(1, 2))[labels > 0] > 0)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"size": 8}, "size = 8"),
        ({"lesion_scale": 0}, "lesion_scale = 0"),
        ({"seed": -1}, "seed = -1"),
        ({"workers": -2}, "workers = -2"),
        ({"n": -1}, "n = -1"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, key):
    args = {"n": 5, "size": 32} | kwargs
    with pytest.raises(UserError, match=key):
        synthetic.generate(**args)
