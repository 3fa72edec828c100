"""Set-up promises: same dependencies for pip and conda, a light import, CI = README's command."""
import re
import subprocess
import sys
from pathlib import Path

import yaml  # pyyaml comes with jupyter

ROOT = Path(__file__).resolve().parent.parent
CONDA_TO_PIP = {"pytorch": "torch"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_and_pyproject_name_the_same_dependencies():
    proj = _pyproject()["project"]
    pip_names = {_name(d) for d in proj["dependencies"] + proj["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            conda_names |= {_name(d) for d in dep["pip"]}
        elif _name(dep) not in ("python", "pip"):
            conda_names.add(CONDA_TO_PIP.get(_name(dep), _name(dep)))
    assert pip_names == conda_names, f"only in pyproject: {pip_names - conda_names}; only in environment.yml: {conda_names - pip_names}"


def test_import_is_light():
    code = "import sys, sara_edu; print(sorted(m for m in ('torch', 'diffusers', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    commands = [l.strip() for l in ci.splitlines() if l.strip() and not l.startswith("#")]
    assert commands[-1] == "make test"


def test_second_make_test_installs_nothing(tmp_path):
    # make plans an install only while the venv's stamp is older than pyproject.toml.
    import os

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stamp = venv / ".sara-edu-installed"
    stamp.touch()
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    plan = subprocess.run(["make", "-n", "test", f"VENV={venv}"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "pip install" not in plan and "pytest" in plan
    older = newer - 3600
    os.utime(stamp, (older, older))
    plan = subprocess.run(["make", "-n", "test", f"VENV={venv}"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "pip install" in plan
