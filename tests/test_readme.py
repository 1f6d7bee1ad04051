"""The code of README.md and of the guides in docs/, run as written: each python block in a fresh
interpreter, each bash block as a script, each in an empty folder.

Skipped on purpose: the `make` and `pip install` blocks (`make test` is what runs this file, and it
installs with pip) and blocks marked `<!-- not run: reason -->` on the line before (fragments,
servers); `make run` is run by its own test when the run environment exists.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- not run:[^>]*-->\n)?```(python|bash)\n(.*?)```", flags=re.S)
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def runnable(kind: str, code: str) -> bool:
    return kind == "python" or not re.match(r"\s*(make|pip) ", code)


CASES = [(page.stem, kind, code) for page in PAGES for skip, kind, code in BLOCK.findall(page.read_text())
         if not skip and runnable(kind, code)]


def test_the_pages_have_the_blocks_we_run():
    readme = [kind for page, kind, _ in CASES if page == "README"]
    assert readme.count("python") >= 2 and {page for page, _, _ in CASES} >= {"README", "cli", "coordinator", "training"}


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the guides in docs/ hold the rest"
    for link in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("page, kind, code", CASES, ids=[f"{p}-{k}-{i}" for i, (p, k, _) in enumerate(CASES)])
def test_block_runs_as_written(tmp_path, page, kind, code):
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
    assert "Over 5 paired seeds, aligned is" in proc.stdout
    assert "wrote runs/shifted_digits-domains-50x8-seed0/" in proc.stdout and "-seed4/" in proc.stdout
