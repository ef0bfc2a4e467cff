"""taskfleet node agents: master, worker and client (standard library only)."""

__version__ = "0.1.0"
