"""Benchmarks against the transport and compute floors (see docs/design.md)."""
