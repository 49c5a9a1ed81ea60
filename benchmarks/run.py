"""``python -m benchmarks.run``: the benchmark runner (:mod:`benchmarks.runner.cli`)."""

from benchmarks.runner.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(1 if main().get("failed") else 0)  # a failed run: a non-zero exit status
