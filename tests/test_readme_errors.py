"""The README's Errors section, claim by claim: each thing a row says is refused is refused, with that class.

The table is read from README.md, so a row that names a case no test here
exercises fails ``test_every_claim_of_the_table_is_exercised``. Each case is a
cheap, in-process instance of the claim (the thorough tests of each refusal
live beside the code: tests/world, tests/sara, tests/training, tests/sd).
"""
import json
import re
from pathlib import Path

import pytest
import torch

import sara_edu as se
from sara_edu import errors
from sara_edu.world.model import TINY_UNET_CONFIG

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = README.read_text().split("## Errors", 1)[1].split("\n## ", 1)[0]
ROWS = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", SECTION, re.MULTILINE))
PROSE = " ".join(SECTION.split())  # the text outside the table, as one line (README lines wrap anywhere)


@pytest.fixture
def data():
    return se.StyleDataset(None, digits=[3], limit_per_digit=4)


def _folder_with(tmp_path, lines, images=()):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for name in images:
        Image.new("RGB", (16, 16), "red").save(folder / name)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _nan(pipe):
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    return pipe


def _saved(pipe, tmp_path):
    return se.save_pretrained(pipe, tmp_path / "model")


def _damage(folder):
    from safetensors.torch import load_file, save_file

    path = folder / "unet.safetensors"
    state = load_file(path)
    state["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, path)  # a well-formed file holding NaN: what a flipped exponent byte gives
    return folder


def _sparse_file(pipe, data, tmp_path):
    method = se.SaRA(fraction=0.1)
    se.train(pipe, data, method, steps=1, batch_size=4, progress=False)
    return se.save_sparse(method.optimizer, tmp_path / "sara.safetensors")


def _study_csv(tmp_path):
    from sara_edu.study.config import SCHEMA, read_results

    path = tmp_path / "results.csv"
    path.write_text(",".join(SCHEMA) + "\n" + ",".join("1" for _ in SCHEMA)[:-3] + "\n")  # a cut last row
    return read_results(path)


def _world_size_without_group(request, pipe):
    request.getfixturevalue("launched_rank")
    opt = se.SaRAAdamW(pipe.unet, lr=1e-3, fraction=0.1)
    opt.step()


def _diverged(pipe, data):
    def poison(step, pipe, optimizer):
        with torch.no_grad():
            pipe.unet.conv_out.bias.fill_(float("inf"))  # finite before the run, diverged during it

    se.train(pipe, data, se.SaRA(fraction=0.1), steps=3, batch_size=4, progress=False, callback=poison)


# (error class, words of its README row, what to run, words the message must hold)
CASES = [
    ("PromptError", "a prompt is missing", lambda p, d, t, m: se.generate(p, [], steps=1), "empty"),
    ("PromptError", "not text", lambda p, d, t, m: se.generate(p, [3], steps=1), "not a string"),
    ("PromptError", "uses a word the course's text encoder does not know",
     lambda p, d, t, m: se.generate(p, ["a digit 3 zebra"], steps=1), "zebra"),
    ("DataError", "a data folder", lambda p, d, t, m: se.ImageFolderDataset(t / "nowhere"), "nowhere"),
    ("DataError", "a `metadata.jsonl` line",
     lambda p, d, t, m: se.ImageFolderDataset(_folder_with(t, ["{not json"])), "metadata.jsonl"),
    ("DataError", "an image",
     lambda p, d, t, m: se.ImageFolderDataset(_folder_with(t, [json.dumps({"file_name": "a.png", "text": "x"})])),
     "a.png"),
    ("DataError", "a line of a study's results CSV", lambda p, d, t, m: _study_csv(t), "results.csv"),
    ("DataError", "a file where a folder is expected",
     lambda p, d, t, m: se.ImageFolderDataset(_saved(p, t) / "config.json"), "file"),
    ("CheckpointError", "a weights or `config.json` file is missing",
     lambda p, d, t, m: se.load_pretrained(t), "config.json"),
    ("CheckpointError", "damaged", lambda p, d, t, m: se.load_pretrained(_damage(_saved(p, t))), "NaN"),
    ("CheckpointError", "made for another model",
     lambda p, d, t, m: se.load_sparse(se.build_unet({**TINY_UNET_CONFIG, "block_out_channels": [16, 32, 32],
                                                      "norm_num_groups": 8}), _sparse_file(p, d, t)), "model"),
    ("CheckpointError", "a sparse file does not fit its base (other weights",
     lambda p, d, t, m: se.load_sparse(se.build_unet(seed=1), _sparse_file(p, d, t)), "base"),
    ("CheckpointError", "refused when loaded, saved, or given to `train()`",
     lambda p, d, t, m: se.save_pretrained(_nan(p), t / "out"), "NaN"),
    ("CheckpointError", "refused when loaded, saved, or given to `train()`",
     lambda p, d, t, m: se.train(_nan(p), d, steps=1, batch_size=4, progress=False), "NaN"),
    ("CheckpointError", "missing where `--resume` asks for one",
     lambda p, d, t, m: se.train(p, d, steps=2, batch_size=4, progress=False, checkpoint_dir=t / "ck",
                                 resume=True), "resume"),
    ("ConfigError", "learning rate", lambda p, d, t, m: se.train(p, d, lr=-1.0, progress=False), "lr"),
    ("ConfigError", "steps", lambda p, d, t, m: se.train(p, d, steps=0, progress=False), "steps"),
    ("ConfigError", "seed", lambda p, d, t, m: se.generate(p, ["a digit 1"], steps=1, seed=-1), "seed"),
    ("ConfigError", "batch size", lambda p, d, t, m: se.train(p, d, batch_size=0, progress=False), "batch_size"),
    ("ConfigError", "guidance scale",
     lambda p, d, t, m: se.generate(p, ["a digit 1"], steps=1, guidance_scale=float("nan")), "guidance_scale"),
    ("ConfigError", "fraction", lambda p, d, t, m: se.SaRAAdamW(p.unet, fraction=1.5), "fraction"),
    ("ConfigError", "threshold (one that selects only all-zero parameters included)",
     lambda p, d, t, m: se.SaRAAdamW(p.unet, threshold=1e-30, fraction=None), "1e-30"),
    ("ConfigError", "a device this machine lacks",
     lambda p, d, t, m: se.train(p, d, steps=1, progress=False, device="cuda:7"), "cuda:7"),
    ("ConfigError", "`WORLD_SIZE` > 1 without a process group",
     lambda p, d, t, m: _world_size_without_group(m, p), "torch.distributed is not initialised"),
    ("FloatingPointError", "`train()` raises it when the loss becomes NaN or infinite from finite weights",
     lambda p, d, t, m: _diverged(p, d), "lower the learning"),
    ("FloatingPointError", "`generate` / `generate_sd` when images come out non-finite",
     lambda p, d, t, m: se.generate(_nan(p), ["a digit 1"], steps=1), "conv_in.weight"),
]


def test_the_table_names_each_error_class_of_the_package():
    classes = {name for name, value in vars(errors).items() if isinstance(value, type)
               and issubclass(value, errors.SaraEduError) and value is not errors.SaraEduError}
    assert set(ROWS) == classes
    assert all(issubclass(getattr(errors, name), ValueError) for name in ROWS)  # "itself a ValueError"


def test_every_claim_of_the_table_is_exercised():
    for name, words, *_ in CASES:
        text = ROWS.get(name, PROSE)
        assert words in text, f"the README's {name} entry no longer says {words!r}: update CASES"
    claimed = {name for name, *_ in CASES}
    assert claimed >= set(ROWS) | {"FloatingPointError"}


@pytest.mark.parametrize("name, words, run, says", CASES, ids=[f"{c[0]}: {c[1][:40]}" for c in CASES])
def test_each_claim_is_refused_with_its_class_and_a_message_that_names_it(name, words, run, says, tiny_pipe, data,
                                                                          tmp_path, request):
    expected = FloatingPointError if name == "FloatingPointError" else getattr(errors, name)
    with pytest.raises(expected) as caught:
        run(tiny_pipe, data, tmp_path, request)
    assert type(caught.value) is expected or name == "FloatingPointError"
    assert says in str(caught.value), str(caught.value)
