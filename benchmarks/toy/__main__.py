"""``python -m benchmarks.toy``: runs :func:`benchmarks.toy.cli.main`."""

from benchmarks.toy.cli import main

if __name__ == "__main__":
    main()
