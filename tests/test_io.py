import json
import os
from pathlib import Path

import pytest
import torch

from sara_edu.errors import CheckpointError
from sara_edu.io import load_tensors, read_metadata, save_tensors


def test_round_trip_with_metadata(tmp_path):
    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int32)}
    save_tensors(t, tmp_path / "x.safetensors", {"step": 3, "cfg": {"k": [1, 2]}})
    back, meta = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and back["b"].dtype == torch.int32
    assert meta == {"step": 3, "cfg": {"k": [1, 2]}}


def test_interrupted_save_keeps_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_tensors({"a": torch.ones(3)}, path)
    import sara_edu.io as sio

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sio, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_tensors({"a": torch.zeros(3)}, path)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    assert torch.equal(load_tensors(path)[0]["a"], torch.ones(3))


def test_missing_corrupt_and_pickle_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tensors(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_metadata(bad)
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="never pickle"):
        load_tensors(pt)
    # a truncated real file
    save_tensors({"a": torch.ones(1000)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_tensors(tmp_path / "t.safetensors")


# --- files written by other tools, and saves killed outright ---------------------------------------------


def test_metadata_written_by_diffusers_or_transformers_is_read_as_text(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"format": "pt", "step": "3", "note": "{not json"})
    assert read_metadata(path) == {"format": "pt", "step": 3, "note": "{not json"}
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["a"], torch.ones(2)) and meta["format"] == "pt"


# How long this test process has been running when a stale-temporary test starts: just started, or hours into a
# slow suite (CI on a busy machine). The ages below count from the process start that sara_edu.io actually uses,
# not from now: a test that planted "an hour old" files failed once the suite had run for more than an hour.
PROCESS_AGES_S = [0.0, 5 * 3600.0]


@pytest.fixture(params=PROCESS_AGES_S, ids=["process just started", "process running for 5 h"])
def process_start(request, monkeypatch):
    """The start time of this process as sara_edu.io sees it, ``request.param`` seconds before now."""
    import time

    import sara_edu.io as sio

    start = time.time() - request.param
    monkeypatch.setattr(sio, "_PROCESS_START", start)
    return start


def _stale(path, process_start, before_start_s=3600.0, name="abcd1234"):
    """A temporary file as a killed save of ``path`` leaves it, last written ``before_start_s`` before this process
    started (negative: after it started, as a live save in another process would)."""
    tmp = path.parent / f".{path.name}.{name}.tmp"
    tmp.write_bytes(b"\0" * 1000)
    mtime = process_start - before_start_s
    os.utime(tmp, (mtime, mtime))
    return tmp


def test_a_save_killed_with_sigkill_is_cleaned_up_by_the_next_save(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "w.safetensors"
    pid = os.fork()
    if pid == 0:  # the child dies mid-save, as under kill -9: no except/finally runs
        try:
            from sara_edu.io import atomic_write_bytes

            def die(tmp):
                with open(tmp, "wb") as f:
                    f.write(b"\0" * 100_000)
                os.kill(os.getpid(), signal.SIGKILL)

            atomic_write_bytes(path, die)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".w.safetensors.") and left[0].endswith(".tmp")
    # This (older) process leaves it alone: the file is newer than the process, so it might be a live save.
    save_tensors({"a": torch.ones(3)}, path)
    assert len(list(tmp_path.iterdir())) == 2
    # The next run (a new process, as after a crash) removes it.
    code = ("import torch; from sara_edu.io import save_tensors; "
            f"save_tensors({{'a': torch.zeros(3)}}, {str(path)!r})")
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    assert torch.equal(load_tensors(path)[0]["a"], torch.zeros(3))


def test_stale_temporaries_are_removed_only_when_surely_dead_and_only_for_that_path(tmp_path, process_start):
    import fcntl

    path = tmp_path / "w.safetensors"
    stale = _stale(path, process_start)
    locked = _stale(path, process_start, name="lock_123")
    recent = _stale(path, process_start, before_start_s=-5, name="new45678")  # written after this process started
    others = [_stale(tmp_path / "other.safetensors", process_start), _stale(path, process_start, name="short"),
              tmp_path / "w.safetensors.abcd1234.tmp"]
    others[-1].write_bytes(b"x")
    with open(locked, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a live writer in another process holds this lock while writing
        save_tensors({"a": torch.ones(3)}, path)
        assert not stale.exists()
        assert locked.exists() and recent.exists() and all(o.exists() for o in others)
    save_tensors({"a": torch.ones(3)}, path)  # the writer is gone: its file is stale now
    assert not locked.exists() and recent.exists() and all(o.exists() for o in others)


def test_a_live_save_keeps_its_temporary_file_even_if_it_looks_old(tmp_path, process_start):
    from sara_edu.io import atomic_write_bytes, remove_stale_temporaries

    path = tmp_path / "w.bin"
    removed = []

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"data")
        old = process_start - 3600
        os.utime(tmp, (old, old))  # as if written before this process started: only the lock protects it
        removed.extend(remove_stale_temporaries(path))  # another process cleaning up meanwhile

    atomic_write_bytes(path, write)
    assert removed == [] and path.read_bytes() == b"data"


@pytest.mark.parametrize("state,msg", [("{not json", "its saved state is not valid JSON"),
                                       ({"__dict__": [["a"]]}, "does not have the structure save_state writes"),
                                       ({"x": 1}, "does not have the structure save_state writes"),
                                       ({"__tensor__": "t9"}, "incomplete: tensor t9 is missing")])
def test_tampered_saved_state_gives_checkpoint_error(tmp_path, state, msg):
    from safetensors.torch import save_file

    from sara_edu.io import load_state

    path = tmp_path / "s.safetensors"
    text = state if isinstance(state, str) else json.dumps(state)
    save_file({"t0": torch.ones(1)}, str(path), metadata={"state": text})
    with pytest.raises(CheckpointError, match=msg):
        load_state(path)


def test_safetensors_own_temporary_is_cleaned_after_a_real_kill_9_mid_save(tmp_path):
    """safetensors' save_file writes its own ``.tmpXXXXXX`` (as large as the file) beside the path it is given and
    renames it: killed mid-write, that file used to stay for ever. It now lies in our temporary folder."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "w.safetensors"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    saver = ("import torch; from sara_edu.io import save_tensors\n"
             "t = {'a': torch.ones(8_000_000)}\n"
             f"while True: save_tensors(t, {str(path)!r})\n")
    child = subprocess.Popen([sys.executable, "-c", saver], env=env)
    try:
        deadline = time.monotonic() + 600  # a ceiling against a hang only
        while not list(tmp_path.rglob(".tmp*")):  # safetensors' own temporary, wherever it is
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)  # caught inside safetensors' own write
    finally:
        child.kill()
        child.wait()
    left = [p for p in tmp_path.iterdir() if p.name != "w.safetensors"]
    assert len(left) == 1 and left[0].is_dir() and left[0].name.startswith(".w.safetensors.")
    # the next run (a new process) removes the folder, safetensors' temporary file included
    code = f"import torch; from sara_edu.io import save_tensors; save_tensors({{'a': torch.zeros(3)}}, {str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    assert torch.equal(load_tensors(path)[0]["a"], torch.zeros(3))
