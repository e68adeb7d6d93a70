"""Make `dvc plots show` draw its plots offline: an HTML template for DVC with Vega, Vega-Lite and Vega-Embed inlined.

DVC's default page loads the three libraries from a CDN, so without network the page is blank. `make install`
runs this script: it fetches the pinned npm tarballs of the versions DVC's renderer targets (dvc_render's
``VegaRenderer.SCRIPTS``), checks each against the registry's sha512 integrity pinned below, and writes
``.dvc/plots/offline.html``, a template with the three minified files inlined (so the page DVC writes is
self-contained wherever it goes), and names it in ``.dvc/config.local`` (``plots.html_template``, this checkout
only: a clone that has not run it keeps DVC's own page; `dvc plots show --html-template` overrides both).
Run again, it only checks what is there.

    python scripts/offline_plots.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"
# (package, version, file in the tarball, the registry's sha512 integrity of the tarball)
PACKAGES = (
    (
        "vega",
        "5.20.2",
        "package/build/vega.min.js",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    (
        "vega-lite",
        "5.2.0",
        "package/build/vega-lite.min.js",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    (
        "vega-embed",
        "6.18.2",
        "package/build/vega-embed.min.js",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
)
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot (offline: Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {vega_embed} inlined)</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what DVC replaces in a template


def tarball(name: str, version: str, integrity: str, cache: Path) -> bytes:
    """The npm tarball of ``name@version``, from ``cache`` or the registry, checked against ``integrity``."""
    path = cache / f"{name}-{version}.tgz"
    data = path.read_bytes() if path.is_file() else b""
    if not _matches(data, integrity):
        url = f"https://registry.npmjs.org/{name}/-/{name.split('/')[-1]}-{version}.tgz"
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
        if not _matches(data, integrity):
            raise SystemExit(f"error: {url} does not match its pinned integrity {integrity}; not installed")
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def _matches(data: bytes, integrity: str) -> bool:
    algo, _, digest = integrity.partition("-")
    return bool(data) and base64.b64encode(hashlib.new(algo, data).digest()).decode() == digest


def script(data: bytes, member: str) -> str:
    """The ``<script>`` element of ``member`` of the tarball, its text inlined."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        text = tar.extractfile(member).read().decode()
    if any(p in text for p in PLACEHOLDERS) or "</script" in text.lower():
        raise SystemExit(f"error: {member} holds a DVC placeholder or a closing script tag; cannot inline it")
    return f"    <script>{text}</script>"


def page(cache: Path) -> str:
    scripts = [
        script(tarball(name, version, integrity, cache), member) for name, version, member, integrity in PACKAGES
    ]
    vega, vega_lite, vega_embed = (version for _, version, _, _ in PACKAGES)
    return PAGE.format(scripts="\n".join(scripts), vega=vega, vega_lite=vega_lite, vega_embed=vega_embed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=TEMPLATE.parent / "npm", help="where the tarballs are kept")
    args = parser.parse_args(argv)
    text = page(args.cache)
    if not TEMPLATE.is_file() or TEMPLATE.read_text() != text:
        TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
        tmp = TEMPLATE.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(TEMPLATE)
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run(
        [str(dvc), "config", "--local", "plots.html_template", TEMPLATE.relative_to(ROOT / ".dvc").as_posix()],
        cwd=ROOT,
        check=True,
    )
    print(f"offline plots: {TEMPLATE.relative_to(ROOT)} ({len(text) // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
