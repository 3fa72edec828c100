"""benchmarks/rerun_drift.py: the same runs of two results CSVs, compared; copied rows are not reruns."""
import importlib.util

import pandas as pd

from sara_edu.world.paths import REPO_ROOT


def _drift():
    spec = importlib.util.spec_from_file_location("rerun_drift", REPO_ROOT / "benchmarks" / "rerun_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.drift


def test_drift_counts_the_runs_that_moved_and_skips_copied_rows():
    old = pd.DataFrame({"run_id": ["a", "b", "c"], "method": ["sara", "lora", "lora"], "phase": "main",
                        "final_loss": [0.1, 0.2, 0.3], "fid": [100.0, 200.0, 300.0], "agreement": [1.0, 0.5, 0.5]})
    new = old.copy()
    new.loc[1, ["final_loss", "fid"]] = [0.25, 260.0]
    new.loc[2, ["phase", "fid"]] = ["main+reused", 999.0]  # copied, not rerun: not compared
    table = _drift()(old, new)
    assert table.loc["sara", "moved"] == 0 and table.loc["lora", "runs"] == 1 and table.loc["lora", "moved"] == 1
    assert abs(table.loc["lora", "max_fid_change"] - 60) < 1e-9
