"""Every benchmark script still starts: its imports resolve and ``--help`` parses (they are not run here).

Two of them had been importing helpers that had moved (tests/support/media.py) without anyone noticing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.vllm_server import REPO_ROOT

SCRIPTS = sorted(p.name for p in (REPO_ROOT / "benchmarks").glob("*.py") if p.name != "support_kb.py")
# One interpreter for all: each script runs as __main__ with --help (argparse exits 0 after printing).
PROBE = """
import runpy, sys
sys.path.insert(0, "benchmarks")  # as `python benchmarks/X.py` has it: sibling modules import
failed = []
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    try:
        runpy.run_path(f"benchmarks/{name}", run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            failed.append(f"{name}: exit {exc.code}")
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
    else:
        failed.append(f"{name}: ran instead of printing its help")
print("FAILED:", failed)
sys.exit(1 if failed else 0)
"""


@pytest.mark.subprocess
def test_every_benchmark_script_starts() -> None:
    assert len(SCRIPTS) >= 10
    proc = subprocess.run([sys.executable, "-c", PROBE, *SCRIPTS], cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
