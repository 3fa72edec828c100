"""Sparse files: exact base check, damaged files refused, tampered metadata named, dtype explained."""
import copy
import json
import struct

import pytest
import torch
from torch import nn

from sara_edu.errors import CheckpointError
from sara_edu.io import load_tensors, save_tensors
from sara_edu.sara.attach import detach
from sara_edu.sara.optimizer import SaRAAdamW
from sara_edu.sara.sparse_file import _legacy_fingerprint, load_sparse, save_sparse


def _base(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


@pytest.fixture
def trained(tmp_path):
    """(base copy, trained model, path of its sparse file)."""
    model = _base()
    base = copy.deepcopy(model)
    opt = SaRAAdamW(model, lr=1e-2, fraction=0.1, rank_lambda=0)
    for i in range(2):
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    path = save_sparse(opt, tmp_path / "s.safetensors")
    detach(opt)
    return base, model, path


def _untouched_position(base, model, name):
    """A flat position of ``name`` that did not train."""
    a, b = dict(base.named_parameters())[name], dict(model.named_parameters())[name]
    return int(torch.nonzero(a.detach().reshape(-1) == b.detach().reshape(-1))[1])  # not one the first format sampled


def test_a_fresh_base_gets_the_trained_model_bit_for_bit(trained):
    base, model, path = trained
    load_sparse(base, path)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters()))


@pytest.mark.parametrize("change", ["sign flip", "one ulp"])
def test_any_change_of_an_untouched_base_value_is_refused(trained, change):
    base, model, path = trained
    pos = _untouched_position(base, model, "2.weight")
    flat = base[2].weight.detach().view(-1)
    if change == "sign flip":  # sum |w| (the first format's check) cannot see it
        flat[pos] = -flat[pos]
    else:  # the next float32: far below the first format's tolerance
        flat.view(torch.int32)[pos] += 1
    with pytest.raises(CheckpointError, match=r"different base weights: the untouched entries of 2\.weight"):
        load_sparse(base, path)


def _data_range(path, key):
    """Absolute byte range of tensor ``key`` inside a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    start, stop = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + stop


@pytest.mark.parametrize("key,bit", [("0.weight::values", 30), ("0.weight::values", 0), ("2.bias::indices", 3)])
def test_flipped_bits_in_stored_tensors_are_refused_not_loaded_as_nan(trained, key, bit):
    base, _, path = trained
    name = key.split("::")[0]
    assert f"{name}::values" in load_tensors(path)[0]
    start, stop = _data_range(path, key)
    assert stop - start >= 4
    raw = bytearray(path.read_bytes())
    raw[start + bit // 8] ^= 1 << (bit % 8)  # the first stored entry; bit 30 of a float32 makes it huge
    path.write_bytes(bytes(raw))
    before = [p.clone() for p in base.parameters()]
    with pytest.raises(CheckpointError, match=rf"damaged: the stored positions or values of {name} do not match"):
        load_sparse(base, path)
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters()))  # nothing half-written


def _rewrite(path, edit):
    tensors, meta = load_tensors(path)
    edit(tensors, meta)
    save_tensors(tensors, path, meta)


def test_non_finite_stored_values_are_refused_even_with_matching_checksums(trained):
    from sara_edu.sara.sparse_file import _tensor_sha256

    base, _, path = trained

    def poison(tensors, meta):
        v = tensors["0.weight::values"]
        v[0] = float("nan")
        meta["params"]["0.weight"]["values_sha256"] = _tensor_sha256(v)

    _rewrite(path, poison)
    with pytest.raises(CheckpointError, match=r"1 stored values of 0\.weight are NaN or infinite"):
        load_sparse(base, path)


def _set(name, key, value):
    def edit(tensors, meta):
        if value is KeyError:
            del meta["params"][name][key]
        else:
            meta["params"][name][key] = value
    return edit


@pytest.mark.parametrize("edit,msg", [
    (lambda t, m: m.pop("params"), "'params' must map every parameter"),
    (lambda t, m: m.__setitem__("params", "{not json"), "'params' must map every parameter"),
    (lambda t, m: m.__setitem__("params", {}), "'params' must map every parameter"),
    (lambda t, m: m["params"].__setitem__("0.weight", [1, 2]), "the record of '0.weight' is not an object"),
    (_set("0.weight", "trained", KeyError), r"'0\.weight' has trained=None"),
    (_set("0.weight", "trained", -1), r"'0\.weight' has trained=-1"),
    (_set("0.weight", "trained", 10**6), r"'0\.weight' has trained=1000000; expected a count between 0 and 512"),
    (_set("0.weight", "shape", "32x16"), r"'0\.weight' has shape '32x16'"),
    (_set("0.weight", "shape", KeyError), r"'0\.weight' has shape None"),
    (_set("0.weight", "dtype", "float99"), r"'0\.weight' has dtype 'float99'"),
    (_set("0.weight", "base_sha256", KeyError), r"'0\.weight' has base_sha256=None"),
    (_set("0.weight", "values_sha256", "zz"), r"'0\.weight' has values_sha256='zz'"),
    (lambda t, m: t.__setitem__("ghost::values", torch.ones(2)), "stores 1 tensors no parameter record mentions"),
    (lambda t, m: t.pop("0.weight::values"), r"incomplete: no 0\.weight::values"),
    (lambda t, m: m.__setitem__("format", "sara-edu-sparse/9"), "not a sara-edu sparse file"),
])
def test_tampered_metadata_gives_checkpoint_error_naming_the_field(trained, edit, msg):
    base, _, path = trained
    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=msg):
        load_sparse(base, path)


def test_a_trained_count_that_disagrees_with_the_stored_tensors_is_refused(trained):
    base, _, path = trained

    def shrink(tensors, meta):
        meta["params"]["0.weight"]["trained"] -= 1

    _rewrite(path, shrink)
    with pytest.raises(CheckpointError, match=r"bad indices/values for 0\.weight"):
        load_sparse(base, path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_copy_of_the_right_base_is_told_it_is_a_dtype_question(trained, dtype):
    base, _, path = trained
    half = copy.deepcopy(base).to(dtype)
    with pytest.raises(CheckpointError, match=rf"trained on float32 weights, but this model holds "
                                              rf"{str(dtype)[6:]}.*convert after loading.*check_base=False"):
        load_sparse(half, path)
    # both ways out give the same model: convert after loading, or load with the check off
    load_sparse(half, path, check_base=False)
    converted = load_sparse(base, path).to(dtype)
    assert all(torch.equal(a, b) for a, b in zip(half.parameters(), converted.parameters()))


def test_files_of_the_first_format_still_load_with_their_own_check(trained):
    base, model, path = trained

    def downgrade(tensors, meta):
        meta["format"] = "sara-edu-sparse/1"
        own = dict(model.named_parameters())
        for name, info in meta["params"].items():
            idx = tensors.get(f"{name}::indices", torch.zeros(0, dtype=torch.long)).long()
            info["fingerprint"] = _legacy_fingerprint(own[name], idx)
            for key in ("base_sha256", "indices_sha256", "values_sha256"):
                info.pop(key, None)

    _rewrite(path, downgrade)
    with pytest.raises(CheckpointError, match="different base weights"):
        load_sparse(_base(seed=1), path)
    load_sparse(base, path)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters()))


def test_a_diverged_run_is_not_saved(tmp_path):
    model = _base()
    opt = SaRAAdamW(model, lr=1e-2, fraction=0.1, rank_lambda=0)
    model(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        model[0].weight.view(-1)[opt.trained_entries()["0.weight"][0]] = float("inf")
    with pytest.raises(CheckpointError, match=r"0\.weight has 1 NaN or infinite trained values: the run diverged"):
        save_sparse(opt, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("key", ["format", "params", "config"])
def test_reserved_metadata_keys_are_refused_before_writing(tmp_path, key):
    from sara_edu.errors import ConfigError

    model = _base()
    opt = SaRAAdamW(model, lr=1e-2, fraction=0.1, rank_lambda=0)
    path = tmp_path / "s.safetensors"
    with pytest.raises(ConfigError, match=rf"reserved key\(s\) '{key}' \(the file's own format, config, params\)"):
        save_sparse(opt, path, {key: "mine", "base_model": "m"})
    assert not path.exists()
    save_sparse(opt, path, {"base_model": "m"})  # other keys are kept beside the reserved ones
    load_sparse(copy.deepcopy(_base()), path)
    detach(opt)


@pytest.mark.parametrize("folder_name", ["run", "run.safetensors"])
def test_a_folder_is_told_it_is_a_folder_and_which_file_to_pass(trained, tmp_path, folder_name):
    base, _, path = trained
    folder = tmp_path / folder_name
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"run(\.safetensors)? is a folder, not a file: pass the \.safetensors "
                                              r"file to read\.$"):
        load_sparse(base, folder)
    (folder / "sara.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"is a folder, not a file: .*\(e\.g\. \S+sara\.safetensors\)"):
        load_sparse(base, folder)
