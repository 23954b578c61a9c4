"""benchmarks/gpu_check.py: bad input is refused in one line before anything runs."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_out_that_is_no_folder_is_refused(tmp_path):
    missing = tmp_path / "absent"
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu-rehearsal", "--out", str(missing)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert f"--out {missing} is not a folder" in out.stderr
    assert not missing.exists()
