"""The public set of public pretraining: made by `dpcam prepare --public`, disjoint from the private set."""

import json
from pathlib import Path

import numpy as np
import pytest

from dpcam.config import PrepareConfig
from dpcam.data import public, store
from dpcam.data.prepare import prepare
from dpcam.errors import UserError


def _cfg(**kw) -> PrepareConfig:
    base = dict(dataset="fund", size=16, seed=0, workers=1, synthetic={"n": 40}, public={"n": 30, "seed": 5})
    return PrepareConfig.model_validate({**base, **kw})


def test_the_public_set_is_another_draw_marked_public_and_checked_against_the_private_set():
    cfg = _cfg()
    private = store.load_dataset(prepare(cfg))
    out = prepare(cfg, public=True)
    assert out == Path("data/prepared/fund-public")
    pub = store.load_dataset(out)
    m = pub.manifest
    assert m["public"] is True and m["public_of"] == "fund" and m["generator"]["seed"] == 5 and m["count"] == 30
    check = m["disjoint_check"]
    assert check["shared_images"] == 0 and check["private"] == "data/prepared/fund"
    assert check["private_images_sha256"] == private.manifest["checksums"]["images.npy"]
    # independently: no public image equals a private one, byte for byte
    priv = {bytes(img.tobytes()) for img in np.asarray(private.images)}
    assert not any(bytes(img.tobytes()) in priv for img in np.asarray(pub.images))


def test_the_private_sets_generator_seed_is_refused():
    with pytest.raises(UserError, match=r"prepare.public.seed = 0 is the private set's generator seed"):
        prepare(_cfg(public={"n": 30, "seed": 0}), public=True)
    assert not Path("data/prepared/fund-public").exists()
    # also the seed the prepared private set records, when params changed since
    prepare(_cfg(seed=3))
    with pytest.raises(UserError, match="is the private set's generator seed"):
        prepare(_cfg(seed=0, public={"n": 30, "seed": 3}), public=True)


def test_a_shared_image_is_refused_naming_both_indices():
    private = store.load_dataset(prepare(_cfg()))
    images = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    assert public.check_disjoint(images, {}, private)["shared_images"] == 0
    images[7] = private.images[12]
    with pytest.raises(UserError, match=r"1 of its 10 images are byte-identical .*public #7 = private #12"):
        public.check_disjoint(images, {}, private)
    same_seed = {"generator": {"name": "synthetic-fundus", "seed": 0}}
    with pytest.raises(UserError, match="both are synthetic-fundus draws with generator seed 0"):
        public.check_disjoint(images[:0], same_seed, private)
    with pytest.raises(UserError, match="prepare both at one size"):
        public.check_disjoint(np.zeros((2, 8, 8, 3), np.uint8), {}, private)


def test_a_real_format_without_a_public_source_writes_a_folder_that_says_so(tmp_path):
    src = tmp_path / "folder"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
    cfg = _cfg(format="imagefolder", source=str(src))
    out = public.prepare_public(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "absent" and m["public"] is True and "grid.finetune.weights" in m["reason"]
    with pytest.raises(UserError, match="no public set: prepare.format is imagefolder"):
        public.open_public(out)


def test_a_set_whose_manifest_does_not_say_public_is_not_a_public_set():
    out = prepare(_cfg())
    with pytest.raises(UserError, match="does not say public: true"):
        public.open_public(out)
