"""Build the node agents into one versioned zipapp with its sha256 beside it.

The archive is reproducible (sorted entries, fixed timestamps): the same sources give
the same bytes, so a re-deploy of an unchanged tree changes nothing on the hosts.
"""

import hashlib
import io
import re
import zipfile
from pathlib import Path

from ops.paths import DIST, ROOT

NODE_DIR = ROOT / "node"
MAIN = b"import sys\nfrom node.cli import main\nsys.exit(main())\n"
EPOCH = (1980, 1, 1, 0, 0, 0)


def version() -> str:
    text = (NODE_DIR / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def artifact_path(dist: Path = DIST) -> Path:
    return dist / f"taskfleet-node-{version()}.pyz"


def _entry(name: str, data: bytes, zf: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo(name, date_time=EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build(dist: Path = DIST) -> Path:
    """Write dist/taskfleet-node-VERSION.pyz and .pyz.sha256 (sha256sum format)."""
    dist.mkdir(parents=True, exist_ok=True)
    target = artifact_path(dist)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _entry("__main__.py", MAIN, zf)
        for path in sorted(NODE_DIR.rglob("*.py")):
            _entry(f"node/{path.relative_to(NODE_DIR).as_posix()}", path.read_bytes(), zf)
    data = b"#!/usr/bin/env python3\n" + buf.getvalue()
    target.write_bytes(data)
    target.chmod(0o755)
    Path(f"{target}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {target.name}\n")
    return target
