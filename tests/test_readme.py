"""README's Python code blocks run, in order, as a reader would paste them (from an empty folder)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs(tmp_path):
    script = "\n\n".join(f"# --- README block {i + 1}\n{block}" for i, block in enumerate(BLOCKS))
    (tmp_path / "readme_blocks.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "readme_blocks.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800, env=env)  # a ceiling against a hang only
    assert done.returncode == 0, done.stderr[-3000:]
