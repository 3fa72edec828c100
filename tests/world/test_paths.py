"""SARA_EDU_DATA set wrong is named as the culprit, not reported as a missing model file."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sara_edu.errors import ConfigError, DataError
from sara_edu.world import paths


def _loaders():
    from sara_edu.lessons.weight_distributions import pretraining_snapshots
    from sara_edu.world.classifier import load_classifier
    from sara_edu.world.model import list_checkpoints, load_pretrained

    return {"load_pretrained": load_pretrained, "list_checkpoints": list_checkpoints,
            "load_classifier": load_classifier, "pretraining_snapshots": pretraining_snapshots}


@pytest.mark.parametrize("loader", sorted(_loaders()))
@pytest.mark.parametrize("value,error,msg", [
    ("", DataError, "SARA_EDU_DATA is set to an empty string. Unset it"),
    ("   ", DataError, "SARA_EDU_DATA is set to an empty string"),
    ("/no/such/folder", DataError, r"SARA_EDU_DATA='/no/such/folder' is not an existing folder\. Point it"),
    ("~/no-such-data", DataError, r"SARA_EDU_DATA='~/no-such-data' is not an existing folder \(~ is not expanded"),
])
def test_a_bad_sara_edu_data_is_named(monkeypatch, loader, value, error, msg):
    monkeypatch.setenv(paths.DATA_ENV, value)
    monkeypatch.setattr(paths, "_AT_IMPORT", value)  # as if it had been set before the import
    with pytest.raises(error, match=msg):
        _loaders()[loader]()


def test_changing_it_after_import_is_an_error_not_ignored(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "_AT_IMPORT", None)
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="SARA_EDU_DATA changed from None to .* after sara_edu was imported"):
        _loaders()["load_pretrained"]()


def test_an_existing_folder_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "_AT_IMPORT", str(tmp_path))
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    assert paths.check_data_dir() == paths.DATA_DIR


def test_set_empty_before_python_starts():
    code = "from sara_edu.world.model import load_pretrained; load_pretrained()"
    root = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env={**os.environ, "SARA_EDU_DATA": "", "PYTHONPATH": root})
    assert run.returncode == 1 and "DataError: SARA_EDU_DATA is set to an empty string" in run.stderr
