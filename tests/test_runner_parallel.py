"""The runner in parallel (benchmarks.runner.workers, .claims, .progress): --workers N and --ray give the results
one worker gives; runners sharing a folder run each job once; stale claims are taken over; failures are reported."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from benchmarks import run as runner  # noqa: E402
from benchmarks.data import default_data_root  # noqa: E402
from benchmarks.runner import claims  # noqa: E402
from benchmarks.runner.config import RunnerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: a tiny real grid: 2 methods x 2 seeds on Yeast, one epoch of 3 batches, no baselines (about a second a run)
TINY = ["--dataset", "yeast", "--methods", "ls", "fairgrad", "--seeds", "0", "1", "--epochs", "1",
        "--limit-train-batches", "3", "--baselines", "false", "--threads", "1", "--progress", "false",
        "--data-kw", '{"batch_size": 64}']
NAMES = sorted(f"{m}__cost-none__seed{s}.json" for m in ("ls", "fairgrad") for s in (0, 1))
TIMINGS = ("wall_time_s", "seconds", "teleport_seconds")


def _need_yeast() -> None:
    if not (default_data_root() / "multilabel" / "yeast.npz").exists():
        pytest.skip("data file multilabel/yeast.npz not available")


def _untimed(obj):
    """A result without its timings; NaN as a string, so that equal records compare equal."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return "nan" if isinstance(obj, float) and math.isnan(obj) else obj


def _results(out: Path) -> dict[str, dict]:
    return {p.name: _untimed(json.loads(p.read_text())) for p in sorted((out / "runs").glob("*.json"))}


def _leftovers(out: Path) -> list[str]:
    """Claims, takeover guards and temporary files left in the results folder."""
    return sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.endswith((".json", ".csv", ".md", ".png")))


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory) -> Path:
    """The tiny grid run by one worker (the reference the parallel runs must match)."""
    _need_yeast()
    out = tmp_path_factory.mktemp("one") / "yeast"
    runner.main([*TINY, "--out", str(out)])
    assert sorted(_results(out)) == NAMES
    return out


# --------------------------------------------------------------------------- options


def test_workers_and_ray_are_validated(monkeypatch) -> None:
    import importlib.util

    with pytest.raises(ValueError, match="workers must be >= 1"):
        RunnerConfig(workers=0)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match=r"lightning-cost\[ray\]"):
        RunnerConfig(ray="local")
    assert RunnerConfig(workers=3).workers == 3


def test_ray_without_ray_is_one_line_naming_the_extra(monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        runner.main(["--dataset", "yeast", "--ray", "local", "--out", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lightning-cost[ray]" in err and "Traceback" not in err


# --------------------------------------------------------------------------- claims


def test_a_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    result = tmp_path / "runs" / "a.json"
    held = claims.claim(result, "a")
    assert held is not None and claims.claim_path(result).is_file()
    assert claims.claim(result, "a") is None  # held by a live process (this one)
    claims.release(result, "not the claim's text")
    assert claims.claim_path(result).is_file()  # only the holder's text releases it
    claims.release(result, held)
    assert not claims.claim_path(result).exists()
    assert claims.claim(result, "a") is not None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_claims_are_taken_over_and_others_respected(tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    path = claims.claim_path(result)
    host = socket.gethostname()
    path.write_text(json.dumps({"host": host, "pid": _dead_pid()}))  # a killed runner's
    assert claims.claim(result) is not None
    path.write_text(json.dumps({"host": "another-" + host, "pid": _dead_pid()}))  # cannot be checked: respected
    assert claims.claim(result) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({"host": host, "pid": sleeper.pid}))  # a live runner's
        assert claims.claim(result) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert claims.claim(result) is not None  # ... until it is killed
    path.write_text("")  # a claim being written
    assert claims.claim(result) is None
    old = time.time() - 2 * claims.UNREADABLE_AFTER_S
    os.utime(path, (old, old))  # ... by a process killed while writing it
    assert claims.claim(result) is not None


def test_one_of_many_racing_claimants_wins_a_stale_claim(tmp_path: Path) -> None:
    result = tmp_path / "r.json"
    won: list[str] = []
    start = threading.Barrier(8)

    def contend() -> None:
        start.wait()
        if (held := claims.claim(result)) is not None:
            won.append(held)

    for _ in range(20):
        won.clear()
        claims.claim_path(result).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
        threads = [threading.Thread(target=contend) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert not claims.claim_path(result).with_name(result.name + ".claim.takeover").exists()


# --------------------------------------------------------------------------- progress


def test_time_left_from_finished_runs() -> None:
    from rich.console import Console

    from benchmarks.runner.progress import GridProgress

    console = Console(file=io.StringIO(), width=200)
    with GridProgress(console, "yeast", total=10, done=4, slots=2, live=False) as p:
        assert math.isnan(p.time_left())
        p.finished("ls seed 0", 10.0, "ok")
        p.finished("ls seed 1", 20.0, "ok")
        p.finished_elsewhere("ls seed 2")
        assert p.time_left() == pytest.approx(15.0 * 3 / 2)  # mean 15 s, 3 left, 2 at once
        p.failed("ls seed 3", "TypeError: no")
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "[5/10] yeast: ls seed 0 done in 10.0s (about 25 s left): ok"  # 10 s x 5 left / 2 at once
    assert lines[2] == "[7/10] yeast: ls seed 2 finished by another runner (about 22 s left)"
    assert lines[3] == "[8/10] yeast: ls seed 3 FAILED (about 15 s left): TypeError: no"
    live = Console(file=io.StringIO(), width=120, force_terminal=True)
    with GridProgress(live, "yeast", total=2, done=1, slots=2, live=True) as p:
        p.finished("ls seed 0", 1.0, "ok")
    assert "2/2" in live.file.getvalue()


# --------------------------------------------------------------------------- real tiny grids


def test_two_workers_write_what_one_worker_writes(one_worker: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "two"
    t0 = time.perf_counter()
    summary = runner.main([*TINY, "--workers", "2", "--out", str(out)])
    print(f"2 workers: {time.perf_counter() - t0:.1f} s")
    assert _results(out) == _results(one_worker)  # bit for bit: weights digest, curves, test metrics
    assert "failed" not in summary and _leftovers(out) == []
    text = capsys.readouterr().out
    done = [ln for ln in text.splitlines() if " done in " in ln]
    assert len(done) == 4 and {ln[:5] for ln in done} == {"[1/4]", "[2/4]", "[3/4]", "[4/4]"}
    assert all("left" in ln for ln in done[:3])
    # a second run finds them all cached
    runner.main([*TINY, "--workers", "2", "--out", str(out)])
    assert "4 of 4 runs already done, 0 to run" in capsys.readouterr().out


def test_two_runners_on_one_folder_run_each_job_once(one_worker: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "benchmarks.run", *TINY, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = [ln.split(": ", 1)[1].split(" done in ")[0] for o in outputs for ln in o.splitlines() if " done in " in ln]
    assert sorted(trained) == sorted(f"{m} cost=none seed {s}" for m in ("ls", "fairgrad") for s in (0, 1))
    assert _results(out) == _results(one_worker) and _leftovers(out) == []
    for o in outputs:  # each runner waited for the other's jobs and reported the whole grid
        assert "[4/4]" in o


def test_a_stale_claim_is_taken_over(tmp_path: Path) -> None:
    _need_yeast()
    out = tmp_path / "stale"
    result = out / "runs" / "ls__cost-none__seed0.json"
    claims.claim_path(result).parent.mkdir(parents=True)
    claims.claim_path(result).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    args = ["--dataset", "yeast", "--methods", "ls", "--seeds", "0", "--epochs", "1", "--limit-train-batches", "3",
            "--baselines", "false", "--threads", "1", "--progress", "false", "--out", str(out)]
    runner.main(args)
    assert json.loads(result.read_text())["method"] == "ls" and _leftovers(out) == []


def test_a_failing_job_is_reported_and_the_rest_finish(tmp_path: Path, capsys) -> None:
    _need_yeast()
    out = tmp_path / "fail"
    summary = runner.main([*TINY, "--workers", "2", "--out", str(out), "--method-kw", '{"fairgrad": {"no_such": 1}}'])
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == ["ls__cost-none__seed0.json",
                                                                     "ls__cost-none__seed1.json"]
    assert sorted(f["run"] for f in summary["failed"]) == ["fairgrad cost=none seed 0", "fairgrad cost=none seed 1"]
    assert all("unexpected keyword argument 'no_such'" in f["error"] for f in summary["failed"])
    text = capsys.readouterr().out
    assert "2 run(s) failed" in text and "yeast: fairgrad cost=none seed 1: TypeError" in text
    assert _leftovers(out) == []  # the failed jobs' claims are gone: a later run retries them


def test_ray_local_writes_what_one_worker_writes(one_worker: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    summary = runner.main([*TINY, "--ray", "local", "--out", str(out)])
    assert "failed" not in summary
    assert _results(out) == _results(one_worker) and _leftovers(out) == []
