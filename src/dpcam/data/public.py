"""Public data for public pretraining: the public set, its disjointness from the private set, and where a
trunk's weights came from.

Private fine-tuning (``train.trainable: head | last-block``) is only as private as its starting point: the
accountant covers the fine-tuning steps, so the trunk must have learnt from data that are **public** and share
no image with the private set. dpcam holds that line three times:

- ``dpcam prepare --public`` (:func:`prepare_public`) writes ``data/prepared/<dataset>-public``: on the built-in
  data a synthetic-fundus draw with another generator seed (``prepare.public.seed``, refused when it equals the
  private set's), on real data the folder ``prepare.public.source``. Its manifest says ``public: true`` and
  records the check against the private set: no image of one is byte-identical to an image of the other
  (:func:`check_disjoint`: a 128-bit BLAKE2b digest of each prepared image, cheap at 32 px);
- a run on the public set (``train.public``, the ``public`` family's trunk) checks it again before training;
- a fine-tuning run from a dpcam run's weights (:func:`trunk_provenance`) checks that the run trained on a
  public set disjoint from this run's private data, and records which (path, manifest checksum).

Weights from elsewhere (``--weights PATH`` of a file with no ``model.json`` beside it, e.g. ImageNet weights
for real data) cannot be checked: the record says so, and the ε assumes they saw none of the private images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from dpcam import guard
from dpcam.config import PrepareConfig
from dpcam.data.store import PreparedDataset, file_sha256, load_dataset
from dpcam.errors import UserError
from dpcam.layout import MODEL_JSON, PREPARED_ROOT, public_dataset, staged_dir

DIGEST = "blake2b-128 of each prepared image's bytes (uint8 H×W×3)"
ABSENT = "absent"  # manifest kind of a public folder that holds no set (a real format without public.source)
CHUNK = 2048  # images hashed per read of the memory map


def image_digests(images: np.ndarray) -> list[bytes]:
    """One 16-byte BLAKE2b digest per image of ``images`` (N, H, W, 3), read in chunks of the memory map."""
    out = []
    for start in range(0, len(images), CHUNK):
        block = np.ascontiguousarray(images[start : start + CHUNK])
        out += [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in block]
    return out


def _generator_seed(manifest: dict[str, Any]) -> int | None:
    gen = manifest.get("generator") or {}
    return gen.get("seed") if gen.get("name") == "synthetic-fundus" else None


def check_disjoint(
    public_images: np.ndarray,
    public_manifest: dict[str, Any],
    private: PreparedDataset,
    public_name: str = "the public set",
) -> dict[str, Any]:
    """Refuse (UserError) a public set that overlaps ``private``; return what was checked (for the manifest/record).

    Overlap: both are synthetic-fundus draws with the same generator seed (the same images, whatever their
    count), images of different sizes (the digests could not compare them), or any public image byte-identical
    to a private one (its index in each set is named).
    """
    pub_seed, priv_seed = _generator_seed(public_manifest), _generator_seed(private.manifest)
    if pub_seed is not None and pub_seed == priv_seed:
        raise UserError(
            f"{public_name} overlaps the private set {private.path}: both are synthetic-fundus draws with generator "
            f"seed {pub_seed}, so they share images; make the public set with another seed (prepare.public.seed)"
        )
    if public_images.shape[1:] != private.images.shape[1:]:
        raise UserError(
            f"{public_name} has {public_images.shape[1]} px images and the private set {private.path} "
            f"{private.images.shape[1]} px: prepare both at one size, so that dpcam can check no image is in both"
        )
    mine = image_digests(private.images)
    where = {d: i for i, d in enumerate(mine)}
    shared = [(i, where[d]) for i, d in enumerate(image_digests(public_images)) if d in where]
    if shared:
        shown = ", ".join(f"public #{a} = private #{b}" for a, b in shared[:3])
        raise UserError(
            f"{public_name} overlaps the private set {private.path}: {len(shared)} of its {len(public_images)} "
            f"images are byte-identical to private images ({shown}); a trunk trained on them without privacy "
            "would leak them: use public data that share no image with the private set"
        )
    return {
        "private": str(private.path),
        "private_images_sha256": private.manifest.get("checksums", {}).get("images.npy"),
        "private_generator_seed": priv_seed,
        "shared_images": 0,
        "method": DIGEST,
    }


def prepare_public(cfg: PrepareConfig, progress: bool = True) -> Path:
    """Write the public set of ``cfg.dataset`` into ``data/prepared/<dataset>-public/`` and return the folder.

    Synthetic: ``cfg.public.n`` images drawn with generator (and split) seed ``cfg.public.seed``; refused when
    that seed is the private set's (``prepare.seed``, or the seed its manifest records). Real formats: the
    folder ``cfg.public.source`` in ``cfg.format``'s layout; without one, the folder holds only a manifest
    saying there is no public set (fine-tuning then needs local weights: ``grid.finetune.weights``).
    When the private set ``data/prepared/<dataset>`` exists, every public image is checked against it
    (:func:`check_disjoint`) before anything is put in place.
    """
    name = public_dataset(cfg.dataset)
    private_dir = PREPARED_ROOT / cfg.dataset
    private = load_dataset(private_dir) if (private_dir / "manifest.json").is_file() else None
    extra = {"public": True, "public_of": cfg.dataset}
    if private is None:
        extra["disjoint_check"] = (
            f"not checked: {private_dir} was not prepared yet; every run on this set and every fine-tuning from it "
            "checks it again"
        )
    check = None if private is None else (lambda images: {"disjoint_check": _check(images, extra, cfg, private)})

    if cfg.format == "synthetic":
        from dpcam.data.synthetic_stage import prepare_synthetic

        seeds = {cfg.seed} | ({s} if private is not None and (s := _generator_seed(private.manifest)) else set())
        if cfg.public.seed in seeds:
            raise UserError(
                f"prepare.public.seed = {cfg.public.seed} is the private set's generator seed: the public set would "
                "repeat the private images; choose another seed"
            )
        pub = cfg.model_copy(
            update={
                "dataset": name,
                "seed": cfg.public.seed,
                "synthetic": cfg.synthetic.model_copy(update={"n": cfg.public.n}),
            }
        )
        return prepare_synthetic(pub, manifest_extra=extra, check=check)
    if cfg.public.source is None:
        return _absent(name, cfg)
    from dpcam.data.sources import prepare_source

    pub = cfg.model_copy(update={"dataset": name, "source": cfg.public.source, "masks": None})
    return prepare_source(pub, progress=progress, manifest_extra=extra, check=check)


def _check(images: np.ndarray, manifest: dict[str, Any], cfg: PrepareConfig, private: PreparedDataset):
    seed = cfg.public.seed if cfg.format == "synthetic" else None
    full = {**manifest, "generator": {"name": "synthetic-fundus", "seed": seed}} if seed is not None else manifest
    return check_disjoint(images, full, private, f"the public set {public_dataset(cfg.dataset)}")


def _absent(name: str, cfg: PrepareConfig) -> Path:
    out = PREPARED_ROOT / name
    manifest = {
        "dataset": name,
        "kind": ABSENT,
        "public": True,
        "public_of": cfg.dataset,
        "count": 0,
        "reason": (
            f"no public set: prepare.format is {cfg.format} and prepare.public.source is null; fine-tune from local "
            "pretrained weights (grid.finetune.weights, --weights PATH) or set prepare.public.source"
        ),
    }
    with staged_dir(out) as tmp:
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def open_public(path: Path) -> PreparedDataset:
    """The public set at ``path``; UserError when it is a folder without a set or its manifest does not say public."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        head = guard.read_json(manifest, fix="prepare the public set again (`dpcam prepare --public`)")
        if head.get("kind") == ABSENT:
            raise UserError(f"{path}: {head.get('reason', 'no public set')}")
    data = load_dataset(path)
    if data.manifest.get("public") is not True:
        raise UserError(
            f"{path}: its manifest does not say public: true; a trunk trained on it without privacy would not be "
            "public pretraining (make the public set with `dpcam prepare --public`)"
        )
    return data


def describe(data: PreparedDataset, checked: dict[str, Any] | None) -> dict[str, Any]:
    """What a record says about the public data a model learnt from: path, manifest checksum, the check."""
    return {
        "path": str(data.path),
        "public": data.manifest.get("public") is True,
        "manifest_sha256": file_sha256(data.path / "manifest.json"),
        "images_sha256": data.manifest.get("checksums", {}).get("images.npy"),
        "images": int(len(data.images)),
        "generator_seed": _generator_seed(data.manifest),
        "disjoint_check": checked,
    }


def public_run_data(data: PreparedDataset, private_dir: Path) -> dict[str, Any]:
    """For a run on the public set: check it against the private set (when prepared) and describe it."""
    data = open_public(data.path)
    private = load_dataset(private_dir) if (private_dir / "manifest.json").is_file() else None
    checked = None if private is None else check_disjoint(data.images, data.manifest, private, str(data.path))
    return describe(data, checked)


def trunk_provenance(weights: Path, private: PreparedDataset, *, private_scheme: bool) -> dict[str, Any]:
    """Where fine-tuning weights came from, as the record states it; refuses a trunk that saw private data.

    A dpcam run's ``model.pt`` (``model.json`` beside it): the data it trained on must be a public set
    disjoint from ``private`` when the fine-tuning is private (``private_scheme``: a DP scheme), else
    UserError; returned: ``run``, ``trunk_scheme`` and :func:`describe` of its data. Any other file:
    ``{"source": "external", ...}`` with what cannot be checked.
    """
    spec_path = Path(weights).parent / MODEL_JSON
    if not spec_path.is_file():
        return {
            "source": "external",
            "weights": str(weights),
            "note": (
                "weights from outside dpcam: the data they were trained on cannot be checked here; the ε covers "
                "the fine-tuning only and assumes they saw none of the private images"
            ),
        }
    spec = guard.read_json(spec_path, fix="train the trunk again", who=f"--weights {weights}: ")
    try:
        data_dir = Path(spec["data_dir"])
        trunk_scheme = spec.get("config", {}).get("scheme")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--weights {weights}: {spec_path} is not a readable dpcam model description ({e})") from None
    try:
        data = open_public(data_dir)
        checked = check_disjoint(data.images, data.manifest, private, f"the trunk's data {data_dir}")
    except UserError as e:
        if not private_scheme:
            return {"source": "dpcam", "run": Path(weights).parent.name, "path": str(data_dir), "public": False}
        raise UserError(
            f"--weights {weights}: its trunk cannot start a private fine-tuning: {e}; the accountant covers only "
            "the fine-tuning, so the trunk must learn from public data only"
        ) from None
    run = Path(weights).parent.name
    return {"source": "dpcam", "run": run, "trunk_scheme": trunk_scheme, **describe(data, checked)}
