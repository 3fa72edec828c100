"""`make lab` starts JupyterLab on this machine only, and also as root (Docker, cloud notebooks)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lab_command(tmp_path, *overrides) -> str:
    # a venv whose stamp is newer than pyproject.toml: make plans no install, only the lab command
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stamp = venv / ".sara-edu-installed"
    stamp.touch()
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    plan = subprocess.run(["make", "-n", "lab", f"VENV={venv}", *overrides], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout
    lines = [line for line in plan.splitlines() if "jupyter lab" in line]
    assert len(lines) == 1, plan
    return lines[0]


@pytest.mark.parametrize("uid, as_root", [("0", True), ("1000", False)])
def test_make_lab_allows_root_only_when_run_as_root(tmp_path, uid, as_root):
    command = _lab_command(tmp_path, f"LAB_UID={uid}")
    assert ("--allow-root" in command.split()) is as_root
    assert "--ip=127.0.0.1" in command.split() and command.endswith("notebooks/")


def test_make_lab_reads_the_real_user_id(tmp_path):
    command = _lab_command(tmp_path)
    assert ("--allow-root" in command.split()) is (os.getuid() == 0)


def test_make_lab_saves_widget_state_with_notebooks(tmp_path):
    """Saved notebooks keep their sliders drawable: this venv's JupyterLab saves widget state by default."""
    import json

    venv = tmp_path / "venv"
    subprocess.run(["make", "lab-settings", f"VENV={venv}"], cwd=ROOT, check=True, capture_output=True)
    defaults = json.loads((venv / "share/jupyter/lab/settings/overrides.d/sara-edu.json").read_text())
    assert defaults["@jupyter-widgets/jupyterlab-manager:plugin"] == {"saveState": True}
    # no "fetch news?" pop-up over notebook 00's first code cell
    assert defaults["@jupyterlab/apputils-extension:notification"] == {"fetchNews": "false", "checkForUpdates": False}
    plan = subprocess.run(["make", "-n", "lab", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "overrides.d/sara-edu.json" in plan  # `make lab` writes it every time
