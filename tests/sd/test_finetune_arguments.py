"""Every argument of the fine-tuning command is checked before the model is loaded or an image decoded."""
import json

import pytest

from sara_edu.sd.finetune import main


@pytest.fixture
def folders(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a"}) + "\n")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


@pytest.mark.parametrize("extra,message", [
    (["--stop-after", "0"], "--stop-after must be a positive integer, got 0"),
    (["--resolution", "7"], "--resolution must be a positive multiple of 8 (the VAE downsamples by 8), e.g. 512, got 7"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--batch-size", "1", "--gradient-accumulation-steps", "2"],
     "--batch-size (the global batch) must be at least processes x --gradient-accumulation-steps = 1 x 2, got 1"),
    (["--warmup-steps", "10", "--steps", "5"], "--warmup-steps must be an integer in [0, --steps), got 10"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be a positive integer (how many checkpoints to keep), got 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be a positive integer (how many checkpoints to keep), "
                                   "got -1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be a positive integer, got 0"),
    (["--validation-every", "2"], "--validation-every needs at least one --validation-prompt"),
    (["--validation-steps", "0"], "--validation-steps must be a positive integer, got 0"),
    (["--threshold", "0"], "--threshold must be a positive number, got 0.0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be a positive number, got inf"),
    (["--progressive-iter", "soon"], "--progressive-iter must be 'half', a step number or 'none', got 'soon'"),
    (["--out", "{root}/a_file"], "--out {root}/a_file is a file: give a folder for the results (new or existing)"),
    (["--model", "{root}/a_file"], "--model {root}/a_file is a file: give a diffusers folder (with unet/, vae/, ...) "
                                   "or a Hub id"),
    (["--data", "{root}/a_file"], "--data {root}/a_file is a file: give a folder of images with a metadata.jsonl"),
    (["--data", "{root}/none"], "--data {root}/none does not exist: give a folder of images with a metadata.jsonl"),
    (["--data", "{root}"], "--data {root} has no metadata.jsonl: add one line per image"),
])
def test_bad_arguments_are_refused_before_any_work(folders, extra, message, capsys, monkeypatch):
    import sara_edu.sd.load as load

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(load, "load_stable_diffusion", no_loading)
    root = str(folders)
    argv = ["--model", f"{root}/no_model", "--data", f"{root}/data", "--out", f"{root}/out", "--no-progress"]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, *[e.format(root=root) for e in extra]])
    assert stopped.value.code == 2
    assert message.format(root=root) in capsys.readouterr().err
    assert not (folders / "out").exists()
