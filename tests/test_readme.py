"""README.md's code, run as written: each python block in a fresh interpreter, each bash block as a script.

Skipped on purpose: the `make` and `pip install` blocks (`make test` is what runs this file, and it
installs with pip); `make run` is run by its own test when the run environment exists.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, flags=re.S)
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def runnable(kind: str, code: str) -> bool:
    return kind == "python" or not re.match(r"\s*(make|pip) ", code)


CASES = [(kind, code) for kind, code in BLOCKS if runnable(kind, code)]


def test_the_readme_has_the_blocks_we_run():
    assert sum(kind == "python" for kind, _ in CASES) >= 2 and sum(kind == "bash" for kind, _ in CASES) >= 1


@pytest.mark.parametrize("kind, code", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_readme_block_runs_as_written(tmp_path, kind, code):
    if kind == "python":
        cmd = [sys.executable, "-c", code]
    else:
        (tmp_path / "block.sh").write_text("set -euo pipefail\n" + code)
        cmd = ["bash", str(tmp_path / "block.sh")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not (ROOT / ".venv" / ".installed-train").exists(), reason="make run's environment is not built")
def test_make_run_as_written():
    proc = subprocess.run(["make", "-s", "run"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global acc" in proc.stdout and "wrote runs/shifted_digits-domains-50x8-seed0/" in proc.stdout
