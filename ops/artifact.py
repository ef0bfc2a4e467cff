"""Build the node agents into one versioned zipapp with its sha256 beside it.

The version is `RELEASE+<digest of node/**/*.py>` (node/version.py): a changed tree gets a
new one, an unchanged tree the same one. The archive is reproducible (sorted entries, fixed
timestamps), so one version always names the same bytes, and a re-deploy of an unchanged
tree changes nothing on the hosts. The zipapp carries its version in node/_build.py, and
dist/VERSION names the last build (the playbooks deploy it unless taskfleet_version is set).
"""

import hashlib
import io
import re
import zipfile
from pathlib import Path

from node import version as node_version
from ops.paths import DIST, ROOT

NODE_DIR = ROOT / "node"
MAIN = b"import sys\nfrom node.cli import main\nsys.exit(main())\n"
EPOCH = (1980, 1, 1, 0, 0, 0)
LATEST = "VERSION"  # in dist/: the version of the last build


def release(node_dir: Path = NODE_DIR) -> str:
    """RELEASE from node/__init__.py of this checkout (read, not imported: the tree may have changed)."""
    text = (node_dir / "__init__.py").read_text()
    return re.search(r'^RELEASE = "([^"]+)"', text, re.M).group(1)


def version(node_dir: Path = NODE_DIR) -> str:
    """The version a build of this tree (or of another copy of node/) gets now."""
    return node_version.source_version(release(node_dir), node_dir)


def artifact_path(dist: Path = DIST) -> Path:
    return dist / f"taskfleet-node-{version()}.pyz"


def _entry(name: str, data: bytes, zf: zipfile.ZipFile) -> None:
    info = zipfile.ZipInfo(name, date_time=EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build(dist: Path = DIST, node_dir: Path = NODE_DIR) -> Path:
    """Write dist/taskfleet-node-VERSION.pyz, its .pyz.sha256 (sha256sum format) and dist/VERSION."""
    dist.mkdir(parents=True, exist_ok=True)
    full = version(node_dir)
    target = dist / f"taskfleet-node-{full}.pyz"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        _entry("__main__.py", MAIN, zf)
        for path in node_version.sources(node_dir):
            _entry(f"node/{path.relative_to(node_dir).as_posix()}", path.read_bytes(), zf)
        _entry(f"node/{node_version.BUILD_MODULE}", f'VERSION = "{full}"\n'.encode(), zf)
    data = b"#!/usr/bin/env python3\n" + buf.getvalue()
    target.write_bytes(data)
    target.chmod(0o755)
    Path(f"{target}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {target.name}\n")
    (dist / LATEST).write_text(full + "\n")
    return target
