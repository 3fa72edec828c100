"""Handouts: each notebook executed (full setting by default) and rendered to one self-contained HTML file.

``make handouts`` (``python -m sara_edu.lessons.handouts notebooks/0*.ipynb``) writes
``handouts/NN_name.html``: figures embedded, widgets as their saved pictures, so
an instructor can hand out (or project) the results without a kernel. Not
committed: they are rebuilt from the notebooks. A notebook with graded
exercises is rendered from its solved version (``notebooks/solutions/``).

``--record notebooks/records`` also writes ``<name>.full.json``: the text of every
output of the full-setting run (tables, printed lines), the machine and the
commit. These *are* committed: the sentences of a notebook that quote its full
setting are checked against them (:mod:`.quoted_numbers`), as its QUICK
sentences are checked against a QUICK run.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def solved_version(path: Path) -> Path:
    """``notebooks/solutions/<name>.ipynb`` when the notebook has exercises, else the notebook itself."""
    solved = path.parent / "solutions" / path.name
    return solved if solved.exists() else path


def to_html(nb, out: Path) -> Path:
    """Write an executed notebook (an ``nbformat`` node) as one HTML file with its figures embedded."""
    from nbconvert import HTMLExporter

    from ..io import atomic_write_bytes

    body, _ = HTMLExporter(embed_images=True).from_notebook_node(nb)
    return atomic_write_bytes(out, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))


def record(nb, out: Path, *, setting: str) -> Path:
    """Write the text of an executed notebook's outputs (no images), with the machine and commit, as JSON."""
    import json
    import platform
    import subprocess
    import time

    from ..io import atomic_write_bytes
    from .quoted_numbers import notebook_texts

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=30).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    _, texts = notebook_texts(nb)
    data = {"setting": setting, "commit": commit, "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform(terse=True)}",
            "texts": [t for t in texts if t.strip()]}
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    return atomic_write_bytes(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def render(path, out_dir, *, quick: bool = False, timeout_s: int = 7200, record_dir=None) -> Path:
    """Execute the notebook at ``path`` (its solved version if it has one) in the full setting (or QUICK) and
    write ``out_dir/<name>.html`` (and with ``record_dir``, ``<name>.full.json`` there); return the HTML's path."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    if path.suffix != ".ipynb" or not path.is_file():
        raise ConfigError(f"path must be a notebook file (.ipynb), got {str(path)!r}")
    source = solved_version(path)
    nb = nbformat.read(source, as_version=4)
    saved = os.environ.get("SARA_EDU_QUICK")
    os.environ["SARA_EDU_QUICK"] = "1" if quick else "0"  # the kernel inherits the setting
    try:
        NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if saved is None:
            os.environ.pop("SARA_EDU_QUICK")
        else:
            os.environ["SARA_EDU_QUICK"] = saved
    if record_dir is not None:
        record(nb, Path(record_dir) / f"{path.stem}.{'quick' if quick else 'full'}.json",
               setting="quick" if quick else "full")
    return to_html(nb, Path(out_dir) / f"{path.stem}.html")


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sara_edu.lessons.handouts",
                                     description="Execute notebooks and render them to HTML handouts.")
    parser.add_argument("notebooks", nargs="+", help="notebook files, e.g. notebooks/0*.ipynb")
    parser.add_argument("--out", default="handouts", help="folder for the HTML files (default: handouts/)")
    parser.add_argument("--quick", action="store_true", help="the QUICK setting (a first look, minutes)")
    parser.add_argument("--record", default=None, metavar="DIR",
                        help="also write each run's output text to DIR/<name>.full.json (.quick.json with --quick); "
                             "the course keeps them in notebooks/records")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        print(f"wrote {render(path, args.out, quick=args.quick, record_dir=args.record)}", flush=True)


if __name__ == "__main__":
    main()
