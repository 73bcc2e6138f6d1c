"""Benchmarks: pipeline end to end, fleet-scale scoring."""
