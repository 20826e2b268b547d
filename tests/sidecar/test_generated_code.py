"""The committed code generated from proto/ is exactly what scripts/gen_protos.sh produces now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "gen_protos.sh"
COMMITTED = ROOT / "sidecar"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(tree: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(tree)): path.read_bytes()
        for path in sorted((tree / "pluginchain").rglob("*"))
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    }


def test_committed_generated_code_matches_the_protos(tmp_path):
    run = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"scripts/gen_protos.sh failed:\n{run.stdout}{run.stderr}"
    fresh = generated_files(tmp_path)
    committed = generated_files(COMMITTED)
    assert fresh, "scripts/gen_protos.sh generated nothing"
    fix = "the generated code is out of date with proto/: run scripts/gen_protos.sh and commit the result"
    assert sorted(committed) == sorted(fresh), f"{fix}\ncommitted: {sorted(committed)}\nexpected: {sorted(fresh)}"
    stale = [name for name in fresh if committed[name] != fresh[name]]
    assert not stale, f"{fix}\ndiffering: {', '.join(stale)}"


def test_each_generated_package_has_its_hand_written_init():
    for package in {path.parent for path in (COMMITTED / "pluginchain").rglob("*_pb2.py")}:
        assert (package / "__init__.py").is_file(), f"{package} needs an __init__.py saying it holds generated code"
