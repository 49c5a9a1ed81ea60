"""The per-method aggregator microbenchmark runs end to end on a tiny J and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import math

from benchmarks.perf import aggregators as bench


def test_tiny_run_writes_rows_ratios_and_compare(tmp_path, capsys):
    methods = ("ls", "rlw", "imtl", "pcgrad", "graddrop", "famo")
    bench.run(methods, ks=(2, 3), ps=(300,), budget_s=0.01, min_reps=3, max_reps=3, out_dir=tmp_path,
              log=lambda s: None, clock="cpu")
    on_disk = json.loads((tmp_path / "aggregators.json").read_text())
    assert on_disk["meta"]["threads"] == 1 and on_disk["meta"]["clock"] == "cpu"
    rows = {(r["method"], r["K"]): r for r in on_disk["rows"]}
    assert set(rows) == {(m, k) for m in methods for k in (2, 3)}
    for (m, k), r in rows.items():
        assert r["reps"] == 3 and r["ours"]["median_ms"] > 0 and r["floor"]["median_ms"] > 0, (m, k)
        assert math.isfinite(r["ratio_floor"])
    if importlib.util.find_spec("torchjd") is not None:  # the [peers] extra (not in the default test install)
        for m in ("ls", "rlw", "imtl", "pcgrad", "graddrop"):  # TorchJD has all of these
            assert math.isfinite(rows[(m, 2)]["ratio_torchjd"]) and rows[(m, 2)]["ratio_torchjd"] > 0
        # deterministic methods computed on the same J agree with the peers
        assert rows[("imtl", 3)]["cos_torchjd"] > 0.9999 and rows[("pcgrad", 2)]["cos_torchjd"] > 0.9999
        assert rows[("ls", 3)]["cos_torchjd"] > 0.9999
    else:
        assert all("ratio_torchjd" not in r for r in rows.values())
    assert "notes" in rows[("imtl", 2)] and "mixin_check" in rows[("imtl", 2)]
    assert "famo" in bench.render(on_disk["rows"])
    bench.main(["--methods", "ls", "--ks", "2", "--ps", "200", "--budget", "0", "--min-reps", "2", "--max-reps", "2",
                "--out", str(tmp_path / "b"), "--compare", str(tmp_path / "aggregators.json")])
    out = capsys.readouterr().out
    assert "before" in out and (tmp_path / "b" / "compare.txt").exists()
