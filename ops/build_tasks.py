"""`invoke build`: the node agents as one versioned zipapp."""

from invoke import task

from ops import artifact


@task
def build(c):
    """Build dist/taskfleet-node-VERSION.pyz (and its .sha256); VERSION = release+digest of node/."""
    path = artifact.build()
    print(f"built {path.relative_to(path.parent.parent)} ({path.stat().st_size} bytes)")
