"""Operator tooling behind tasks.py: build, local cluster, deploy, fleet operations."""
