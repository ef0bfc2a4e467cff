"""Paths shared by the operator tasks."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
INVENTORY_DIR = ROOT / "inventory"
LOCAL_INVENTORY = INVENTORY_DIR / "local"
CLUSTER_DIR = ROOT / ".cluster"  # VAGRANT_HOME, the locally built box, helper state
