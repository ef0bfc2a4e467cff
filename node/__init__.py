"""taskfleet node agents: master, worker and client (standard library only)."""

__version__ = "0.1.0"
PROTOCOL = 2  # the calls between agents; a peer speaking another version is refused at hello
