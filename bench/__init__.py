"""Benchmarks against the transport and compute floors (see DESIGN.md)."""
