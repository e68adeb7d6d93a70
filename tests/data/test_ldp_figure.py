import pytest
from PIL import Image

from dpcam.data import ldp
from dpcam.data.ldp_figure import figure_ldp
from dpcam.errors import UserError
from tests.data.ldp_helpers import cfg, write_source


def test_figure_ldp_grid(tmp_path):
    src = write_source(tmp_path / "prepared/tiny", n=30, h=12, w=12)
    for mech in ("singh-sikka", "dp-pix"):
        for eps in (1, 0.25, 0.5):
            ldp.derive(src, mech, eps, cfg(), out_root=tmp_path / "ldp", progress=False)
    out = figure_ldp("tiny", tmp_path / "fig/ldp.png", root=tmp_path / "ldp", prepared=tmp_path / "prepared")
    img = Image.open(out)
    assert img.size[0] > 300 and img.size[1] > img.size[0]  # 8 rows × 4 columns
    assert not [p for p in (tmp_path / "fig").iterdir() if p.name != "ldp.png"]


def test_figure_ldp_errors(tmp_path):
    with pytest.raises(UserError, match="dpcam ldp"):
        figure_ldp("tiny", tmp_path / "f.png", root=tmp_path / "ldp", prepared=tmp_path / "prepared")
    src = write_source(tmp_path / "prepared/tiny")
    ldp.derive(src, "dp-pix", 1, cfg(), out_root=tmp_path / "ldp", progress=False)
    write_source(tmp_path / "prepared/tiny", seed=9)  # re-prepared: the derivative is stale
    with pytest.raises(UserError, match="rerun `dpcam ldp"):
        figure_ldp("tiny", tmp_path / "f.png", root=tmp_path / "ldp", prepared=tmp_path / "prepared")
