"""A small real run of the engines' step-time benchmark (the full run writes docs/results/perf/gramian.*)."""

import json

from benchmarks.perf import gramian


def test_quick_benchmark_times_every_method_on_both_engines(tmp_path):
    gramian.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gramian.json").read_text())
    mlp = results["setups"][0]
    assert mlp["kind"] == "tox21mlp" and mlp["paths"]["trunk.0"] == "gram"
    for method in gramian.METHODS:
        for engine in ("jacobian", "gramian", "gramian_1st"):
            assert mlp["methods"][method][engine]["ratio_vs_ls"] > 0
    assert "Gramian engine paths" in (tmp_path / "gramian.txt").read_text()
    assert mlp["split"].startswith("two stages")
