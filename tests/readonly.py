"""Make folders and files read-only in a test, also when the tests run as root (CI containers)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """``paths`` unwritable for the block: mode bits without w, and for root (whom modes do not stop)
    the immutable attribute (``chattr +i``); skips the test where that is not possible."""
    modes = {Path(p): Path(p).stat().st_mode for p in paths}
    immutable: list[Path] = []
    try:
        for p, mode in modes.items():
            os.chmod(p, mode & ~0o222)
        if os.geteuid() == 0:
            for p in modes:
                try:
                    done = subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode == 0
                except FileNotFoundError:
                    done = False
                if not done:
                    pytest.skip("running as root where chattr +i is not available: nothing is read-only for root")
                immutable.append(p)
        yield
    finally:
        for p in immutable:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        for p, mode in modes.items():
            os.chmod(p, mode)
