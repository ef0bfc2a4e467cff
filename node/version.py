"""Which build of the agents this is: the release line plus a digest of the sources.

Every build of a changed tree gets its own version, `RELEASE+<12 hex>` (a PEP 440 local
version): the hex is the start of a sha256 over the paths and bytes of node/**/*.py, so
an unchanged tree keeps its version and any change (committed or not) gives a new one.
The zipapp carries the version it was built with in node/_build.py (written by
ops/artifact.py); run from a source tree, the agents compute the same digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BUILD_MODULE = "_build.py"  # generated into the zipapp, never in the tree; not part of the digest


def sources(node_dir: Path) -> list[Path]:
    """The files whose bytes make a build: node/**/*.py, sorted, the generated module left out."""
    return sorted(p for p in node_dir.rglob("*.py") if p.relative_to(node_dir).as_posix() != BUILD_MODULE)


def digest(node_dir: Path) -> str:
    """12 hex of a sha256 over each source's relative path and bytes."""
    h = hashlib.sha256()
    for path in sources(node_dir):
        data = path.read_bytes()
        h.update(f"{path.relative_to(node_dir).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:12]


def source_version(release: str, node_dir: Path) -> str:
    """The version a build of this tree gets: `release+digest`."""
    return f"{release}+{digest(node_dir)}"
