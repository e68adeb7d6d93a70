import numpy as np
import pytest
from PIL import Image

from dpcam.data import store
from dpcam.data.decode import load_image
from dpcam.errors import UserError
from tests.data.source_helpers import OUT, make_folder, manifest, prep, save, smooth

# ------------------------------------------------------------------------------------ preprocessing


def test_fundus_crop_removes_border_and_pads_to_square(tmp_path):
    a = np.zeros((60, 100, 3), np.uint8)
    a[20:40, 30:70] = (200, 120, 60)  # a 40x20 "retina" on black, off-centre
    p = save(tmp_path / "f.png", a)
    x = load_image(p, 16, fundus=True)
    assert x.shape == (16, 16, 3) and x.dtype == np.uint8
    # the retina box fills the width; the height is padded with black above and below (4 rows each)
    assert np.abs(x[7:9, 3:13].astype(int) - (200, 120, 60)).max() <= 1
    assert x[0].max() == 0 and x[-1].max() == 0 and x[4:12].min() > 0
    # without fundus preprocessing: centre 60x60 square, the retina covers only the middle
    y = load_image(p, 15)
    assert y[:, 0].max() < 20 and np.abs(y[7, 7].astype(int) - (200, 120, 60)).max() <= 4


def test_nonsquare_centre_crop_and_rgb(tmp_path):
    a = np.zeros((30, 40), np.uint8)
    a[:, :5] = 255  # left 5 columns fall outside the centre 30x30 square
    a[:, 35:] = 255
    x = load_image(save(tmp_path / "g.png", a), 30)
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
    x = load_image(p, 32)
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
    x = load_image(p, 30)
    np.testing.assert_array_equal(x[..., 0], (a[:, 5:35] >> 8).astype(np.uint8))
    assert (x[..., 0] == x[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    a = smooth(30, 30)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    p = save(tmp_path / "r.png", a, exif=exif)
    np.testing.assert_array_equal(load_image(p, 30), a[::-1, ::-1])
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
