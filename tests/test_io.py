import os

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
