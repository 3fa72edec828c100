"""Fine-tune Stable Diffusion on an image folder with SaRA, LoRA or full fine-tuning: the command.

Like the authors' ``finetune.py`` and diffusers' ``train_text_to_image.py``, with
the paper's defaults (θ=2e-3, λ=5e-4, progressive adjustment at half of the run,
AdamW weight decay 1e-2, cosine schedule)::

    python -m sara_edu.sd.finetune --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data my_style/ --method sara --steps 1000 --batch-size 8 --out runs/my_style
    accelerate launch --num_processes 2 -m sara_edu.sd.finetune ...   # several GPUs, same result

``--data`` is a folder of images with a ``metadata.jsonl`` (``file_name``,
``text`` per line). It trains through :func:`sara_edu.training.train`, the loop
the course uses, so several processes, gradient accumulation, mixed precision
(on CUDA), checkpoints and ``--resume`` behave exactly as there. ``--batch-size``
is the global batch of one optimizer step (all processes and accumulation steps
together). The result in ``--out``:

* ``sara``: ``sara.safetensors``, only the trained entries (load with
  :func:`sara_edu.sara.load_sparse` into the same base UNet);
* ``lora``: ``lora.safetensors``, the adapter (:func:`sara_edu.training.lora.load_lora`);
* ``full``: ``pipeline/``, the whole fine-tuned diffusers pipeline;
* ``--save-pipeline`` also writes ``pipeline/`` for SaRA and LoRA (merged: a plain
  ``StableDiffusionPipeline``, no adapter, no inference cost);
* ``history.csv`` (loss, learning rate per step), ``validation/`` images of the
  ``--validation-prompt`` every ``--validation-every`` steps and at the end
  (PNGs and, for exact comparisons, ``final.safetensors``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import ConfigError, DataError, SaraEduError

PROGRESSIVE_DEFAULT = "half"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sara_edu.sd.finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hub id or local diffusers folder of Stable Diffusion 1.x/2.x")
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl (file_name, text)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=("sara", "lora", "full"), default="sara")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="global batch per optimizer step")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: bf16/fp16 on CUDA, no on CPU")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's, 512 for SD1.5)")
    p.add_argument("--threshold", type=float, default=2e-3, help="SaRA: train the entries with |w| < threshold")
    p.add_argument("--rank-lambda", type=float, default=5e-4, help="SaRA: nuclear-norm weight (0: off)")
    p.add_argument("--progressive-iter", default=PROGRESSIVE_DEFAULT,
                   help="SaRA: step of progressive adjustment: 'half' (the authors'), a step, or 'none'")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (in OUT/checkpoints)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep (at least 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT/checkpoints, with the same --model and settings "
                        "(anything else is refused; so is a new run into an OUT that holds checkpoints)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of the --steps schedule (resume later with --resume)")
    p.add_argument("--validation-prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--validation-every", type=int, default=None, help="steps between validation images")
    p.add_argument("--validation-steps", type=int, default=25, help="sampling steps of validation images")
    p.add_argument("--save-pipeline", action="store_true", help="also save the merged pipeline (sara, lora)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def make_method(args):
    from ..training import FullFineTuning, LoRA, SaRA

    if args.method == "sara":
        progressive = args.progressive_iter
        if str(progressive).lower() == "none":
            progressive = None
        elif progressive != PROGRESSIVE_DEFAULT:
            try:
                progressive = int(progressive)
            except ValueError:
                raise SaraEduError(f"--progressive-iter must be 'half', a step number or 'none', got {progressive!r}")
        return SaRA(threshold=args.threshold, fraction=None, rank_lambda=args.rank_lambda,
                    progressive_iter=progressive, seed=args.seed)
    if args.method == "lora":
        return LoRA(rank=args.lora_rank)
    return FullFineTuning()


def check_args(args, processes: int) -> None:
    """Refuse every impossible argument before the model is loaded or an image decoded."""
    import math

    problems = []

    def need(ok, flag, what):
        if not ok:
            problems.append(f"{flag} must be {what}, got {getattr(args, flag[2:].replace('-', '_'))!r}")

    def number(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    need(args.steps >= 1, "--steps", "a positive integer")
    need(args.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps", "a positive integer")
    if args.batch_size < max(1, processes * args.gradient_accumulation_steps):
        problems.append(f"--batch-size (the global batch) must be at least processes x --gradient-accumulation-steps "
                        f"= {processes} x {args.gradient_accumulation_steps}, got {args.batch_size}: every process "
                        "needs a sample per micro-batch")
    need(number(args.lr) and args.lr > 0, "--lr", "a positive number")
    need(0 <= args.warmup_steps < max(args.steps, 2), "--warmup-steps", "an integer in [0, --steps)")
    need(number(args.weight_decay) and args.weight_decay >= 0, "--weight-decay", "a number >= 0")
    need(number(args.max_grad_norm) and args.max_grad_norm > 0, "--max-grad-norm", "a positive number")
    need(args.resolution is None or (args.resolution > 0 and args.resolution % 8 == 0), "--resolution",
         "a positive multiple of 8 (the VAE downsamples by 8), e.g. 512")
    need(number(args.threshold) and args.threshold > 0, "--threshold", "a positive number")
    need(number(args.rank_lambda) and args.rank_lambda >= 0, "--rank-lambda", "a number >= 0 (0: off)")
    need(args.lora_rank >= 1, "--lora-rank", "a positive integer")
    for flag in ("--checkpoint-every", "--stop-after", "--validation-every"):
        need(getattr(args, flag[2:].replace("-", "_")) is None or getattr(args, flag[2:].replace("-", "_")) >= 1,
             flag, "a positive integer")
    need(args.keep_checkpoints >= 1, "--keep-checkpoints", "a positive integer (how many checkpoints to keep)")
    need(args.validation_steps >= 1, "--validation-steps", "a positive integer")
    if args.validation_every is not None and not args.validation_prompt:
        problems.append("--validation-every needs at least one --validation-prompt")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        problems.append(f"--out {args.out} is a file: give a folder for the results (new or existing)")
    model = Path(args.model).expanduser()
    if model.exists() and not model.is_dir():
        problems.append(f"--model {args.model} is a file: give a diffusers folder (with unet/, vae/, ...) or a Hub id")
    if problems:
        raise ConfigError("; ".join(problems))
    make_method(args)  # --progressive-iter
    data = Path(args.data)
    if not data.is_dir():
        raise DataError(f"--data {args.data} " + ("is a file" if data.exists() else "does not exist")
                        + ": give a folder of images with a metadata.jsonl (file_name, text per line)")
    if not (data / "metadata.jsonl").is_file():
        raise DataError(f"--data {args.data} has no metadata.jsonl: add one line per image, "
                        '{"file_name": "0001.png", "text": "a prompt"}')


def run_settings(args, resolution=None) -> dict:
    """What a resumed run must share with the run it continues, named as the user gives it."""
    from ..io import file_sha256

    settings = {"--method": args.method, "--steps": args.steps, "--batch-size": args.batch_size,
                "--gradient-accumulation-steps": args.gradient_accumulation_steps, "--lr": args.lr,
                "--warmup-steps": args.warmup_steps, "--weight-decay": args.weight_decay,
                "--max-grad-norm": args.max_grad_norm, "--seed": args.seed,
                "--data": f"metadata.jsonl SHA-256 {file_sha256(Path(args.data) / 'metadata.jsonl')[:16]}"}
    if args.method == "sara":
        settings.update({"--threshold": args.threshold, "--rank-lambda": args.rank_lambda,
                         "--progressive-iter": str(args.progressive_iter)})
    elif args.method == "lora":
        settings["--lora-rank"] = args.lora_rank
    if resolution is not None:
        settings["--resolution"] = resolution
    if args.mixed_precision is not None:
        settings["--mixed-precision"] = args.mixed_precision
    return settings


def _save_images(images: torch.Tensor, folder: Path, stem: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arrays = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{stem}_{i}.png")


def run(args) -> Path:
    from accelerate import PartialState

    from ..io import atomic_write_bytes, save_tensors
    from ..training import train
    from ..training.checkpoint import check_resume
    from ..world.data import ImageFolderDataset
    from .load import load_stable_diffusion
    from .sample import generate_sd

    out = Path(args.out)
    state = PartialState(cpu=not torch.cuda.is_available())  # the state train() will find
    check_args(args, state.num_processes)
    if args.checkpoint_every is not None or args.resume:  # train() checks again, with the base model's fingerprint
        check_resume(out / "checkpoints", resume=args.resume, settings=run_settings(args, args.resolution),
                     saving=args.checkpoint_every is not None)
    device = state.device if state.num_processes > 1 else None
    pipe = load_stable_diffusion(args.model, device=device)
    resolution = args.resolution or pipe.resolution
    if resolution % pipe.vae_scale_factor:
        raise ConfigError(f"--resolution must be a multiple of the VAE's scale factor {pipe.vae_scale_factor}, "
                          f"got {resolution}")
    data = ImageFolderDataset(args.data, size=resolution)
    method = make_method(args)
    validation = out / "validation"

    def validate(step, pipe_, optimizer):
        if args.validation_prompt and args.validation_every and step % args.validation_every == 0 \
                and state.is_main_process:
            images = generate_sd(pipe_, args.validation_prompt, steps=args.validation_steps, seed=args.seed)
            _save_images(images, validation, f"step_{step:06d}")

    history = train(pipe, data, method, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                    max_grad_norm=args.max_grad_norm, seed=args.seed, device=device,
                    mixed_precision=pipe.mixed_precision if args.mixed_precision is None else args.mixed_precision,
                    gradient_accumulation_steps=args.gradient_accumulation_steps,
                    progress=not args.no_progress, desc=f"{args.method} fine-tuning", callback=validate,
                    checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=args.keep_checkpoints, resume=args.resume, stop_after=args.stop_after,
                    run_settings=run_settings(args, resolution))
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "history.csv", lambda tmp: history.to_csv(tmp, index=False))
        _save_result(args, method, pipe, out)
        if args.validation_prompt:
            images = generate_sd(pipe, args.validation_prompt, steps=args.validation_steps, seed=args.seed)
            _save_images(images, validation, "final")
            save_tensors({"images": images}, validation / "final.safetensors",
                         {"prompts": args.validation_prompt, "steps": args.validation_steps, "seed": args.seed})
        info = {"method": args.method, "steps": args.steps, "steps_done": int(history.step.iloc[-1]),
                "final_loss": float(history.loss.iloc[-1]),
                "processes": state.num_processes}
        atomic_write_bytes(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    state.wait_for_everyone()
    return out


def _save_result(args, method, pipe, out: Path) -> None:
    from ..training.lora import merge_lora, save_lora

    if args.method == "sara":
        method.save(out / "sara.safetensors", {"base_model": str(args.model)})
        method.detach()  # a plain UNet with the trained weights
    elif args.method == "lora":
        save_lora(pipe.unet, out / "lora.safetensors")
        if args.save_pipeline:
            pipe.unet = merge_lora(pipe.unet)
    if args.method == "full" or args.save_pipeline:
        pipe.pipeline().save_pretrained(out / "pipeline", safe_serialization=True)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = run(args)
    except SaraEduError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"done: results in {out}")


if __name__ == "__main__":
    main()
