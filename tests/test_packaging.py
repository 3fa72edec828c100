"""Set-up promises: same dependencies for pip and conda, a light import, CI = README's command."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_the_package_list_names_every_sub_package():
    """pyproject lists packages by hand (so data/ can ship as sara_edu._data): a new folder must be added there."""
    listed = {p for p in _pyproject()["tool"]["setuptools"]["packages"] if not p.startswith("sara_edu._data")}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sara_edu").rglob("__init__.py")}
    assert listed == found, f"add to pyproject: {found - listed}; remove: {listed - found}"


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_has_the_course_model(tmp_path):
    """`pip install .` (not editable), then load_pretrained() + generate() from an unrelated folder."""
    import shutil
    import sysconfig

    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if name.startswith(("sara_edu/", "data/")) or name in ("pyproject.toml", "README.md"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("sara_edu-*.whl")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    # the dependencies (torch, diffusers, ...) come from this venv, appended after the fresh site-packages,
    # so `import sara_edu` finds the installed wheel, never this checkout
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sara_edu, torch; print(sara_edu.__file__); pipe = sara_edu.load_pretrained(); "
            "images = sara_edu.generate(pipe, ['a digit 3', 'a digit 7'], steps=3, seed=0); "
            "print(tuple(images.shape), bool(torch.isfinite(images).all()))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SARA_EDU_DATA")}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=elsewhere, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    where, result = out.stdout.strip().splitlines()[-2:]
    assert Path(where).resolve().is_relative_to(site.resolve()), f"imported {where}, not the installed wheel"
    assert result == "(2, 3, 16, 16) True"
