"""Debian packages a task needs on this machine, installed with apt-get when missing.

Used by `cluster.up` (vagrant, lxc, ...) and `test` (chromium and chromium-driver for the
dashboard's browser tests, prometheus for the end-to-end tier). Installing needs root and
apt-get; `can_install` says whether this machine has both.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from invoke.exceptions import Exit


def missing(packages) -> list[str]:
    """The packages of `packages` that dpkg does not report installed (all of them without dpkg)."""
    if not shutil.which("dpkg-query"):
        return list(packages)
    out = []
    for pkg in packages:
        found = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if found.returncode != 0 or "install ok installed" not in found.stdout:
            out.append(pkg)
    return out


def can_install() -> bool:
    """Root, with apt-get and dpkg."""
    return os.geteuid() == 0 and shutil.which("apt-get") is not None and shutil.which("dpkg-query") is not None


def ensure(packages, who: str) -> None:
    """Install what is missing of `packages` (apt-get update, then install without
    recommends). Exit (code 1) naming `who` if it cannot be done."""
    needed = missing(packages)
    if not needed:
        return
    if not shutil.which("apt-get"):
        raise Exit(f"{who}: missing {' '.join(needed)} and no apt-get here: install them by hand.", code=1)
    print(f"==> installing Debian packages: {' '.join(needed)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *needed]):
        proc = subprocess.run(cmd, env=env, text=True)
        if proc.returncode != 0:
            raise Exit(f"{who}: `{' '.join(cmd)}` failed with exit code {proc.returncode} (output above)", code=1)
