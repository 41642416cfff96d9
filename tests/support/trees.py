"""Working trees compared byte for byte, and git run in them, as the end-to-end tests
check what a snapshot, a restore or another host brought back."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def manifest(root: Path) -> dict[str, tuple[int, str]]:
    """path -> (mode, content hash or link target), for byte-for-byte comparison."""
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = (st.st_mode, "link:" + os.readlink(p))
            elif p.is_file():
                out[rel] = (st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = (st.st_mode, "dir")
    return out


def git(cwd: Path, *args: str) -> str:
    """``git <args>`` in ``cwd`` (raising on failure); its standard output."""
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout
