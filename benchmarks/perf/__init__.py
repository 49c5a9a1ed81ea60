"""Performance benchmarks of lightning_cost (``python -m benchmarks.perf.bench``)."""
