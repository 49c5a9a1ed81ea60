import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: the suite runs on 2 shared cores and the DDP tests start 2 processes;
# more threads oversubscribe the cores and make every test slower.
torch.set_num_threads(1)

DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


@pytest.fixture
def run_ddp(tmp_path):
    """``run_ddp(mode)`` runs tests/scripts/ddp_run.py in ``mode`` as a 2-process CPU DDP fit and returns
    the finished process (its combined output in ``.stderr``) and the two ranks' saved states."""

    def run(mode: str):
        proc = subprocess.run([sys.executable, str(DDP_SCRIPT), str(tmp_path), mode], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]

    return run
