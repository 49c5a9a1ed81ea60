"""``python -m benchmarks.run``: the benchmark runner (:mod:`benchmarks.runner.cli`)."""

from benchmarks.runner.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
