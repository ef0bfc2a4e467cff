"""taskfleet node agents: master, worker and client (standard library only)."""

RELEASE = "0.1.0"  # the release line; every build adds a digest of its sources (node/version.py)
# The calls between agents; a worker's protocol goes with its hello. A master serves workers
# of its own protocol and of the one before, and refuses any other plainly; so upgrades go
# master first, rollbacks workers first (docs/operations.md, "Version skew").
# 3: hello carries the worker's version (shown in status).
PROTOCOL = 3
OLDEST_WORKER_PROTOCOL = PROTOCOL - 1


def _version() -> str:
    try:  # the zipapp: the version it was built with (ops/artifact.py writes node/_build.py)
        from node._build import VERSION
        return VERSION
    except ImportError:  # a source tree: the same digest a build of it would get
        from pathlib import Path

        from node.version import source_version
        return source_version(RELEASE, Path(__file__).resolve().parent)


__version__ = _version()
