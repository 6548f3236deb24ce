"""Benchmarks: scripts that measure and print/write tables (never timed tests)."""
