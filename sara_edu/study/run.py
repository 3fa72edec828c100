"""The study: does the paper's comparison hold on the course model?

One command trains every method of the paper's Table 1 (and SaRA's ablations)
on each of the five styles with several seeds, evaluates each fine-tuned model
the same way, and appends one row per run to a CSV::

    python -m sara_edu.study run            # the full study (resumable), -> reports/study_results.csv
    python -m sara_edu.study run --quick    # a reduced grid for CI, a minute or two
    python -m sara_edu.study report         # tables + figures -> reports/study.md

What one *run* is (:func:`run_one`): a fresh copy of the pretrained model,
``steps`` training steps of one method on one style (digits 0-6, a few images
per digit, like the paper's style sets of tens of images), then

* **style** (the paper's FID and CLIP score): samples of ``"a digit k, <style>
  style"`` for the fine-tuning digits, scored with :func:`~sara_edu.world.metrics.fid_analogue`
  and :func:`~sara_edu.world.metrics.prompt_agreement` (VLHI is computed by the report,
  across the methods of one style and seed, as in the paper);
* **generalisation**: the same for the digits left out of fine-tuning (7-9);
* **retention**: plain prompts ``"a digit k"`` after fine-tuning, scored the same
  way and compared, sample by sample (same noise), with the pretrained model's;
* **cost**: trainable numbers, peak memory above the frozen weights (counted
  exactly by :class:`~sara_edu.measure.memory.MemoryTracker` over the first steps), the
  median step time and the size of the file the method saves.

The grid (:class:`StudyConfig`): a small learning-rate search (the same number
of candidates for every method, on one style and seed, picked by VLHI among the
candidates), then every method x style x seed at its chosen rate, then SaRA's
sensitivity sweeps over the trained fraction (θ) and the nuclear-norm weight λ.

Resuming: every run has an id derived from its settings; rows already in the
CSV are never recomputed, so an interrupted study continues where it stopped.
The CSV is rewritten atomically after every run (:func:`sara_edu.io.atomic_write_bytes`),
so an interruption never leaves it half-written. Runs that diverge (the loss
becomes NaN at a too-large learning rate) are recorded with ``status="diverged"``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from ..errors import ConfigError, DataError
from .config import (
    FULL,
    METHOD_LABELS,
    PRETRAINED,
    SCHEMA,
    SELECTION_METHODS,
    TRACKED_STEPS,
    StudyConfig,
    read_results,
    write_results,
)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a method (or the pretrained reference) on one style and seed."""

    method: str
    style: str
    seed: int
    lr: float = math.nan
    fraction: float = math.nan
    rank_lambda: float = math.nan
    prior: bool = False  # plain prompts mixed into the style set (the retention lesson)

    def key(self, config: StudyConfig) -> dict:
        """Everything that determines the run's result (not the phase that asked for it)."""
        def num(x):
            return None if isinstance(x, float) and math.isnan(x) else float(f"{x:.6g}")

        training = {} if self.method == PRETRAINED else {
            "lr": num(self.lr), "fraction": num(self.fraction), "rank_lambda": num(self.rank_lambda),
            "steps": config.steps, "batch_size": config.batch_size, "limit_per_digit": config.limit_per_digit}
        if self.prior:
            training["prior"] = True
        return {"method": self.method, "style": self.style, "seed": self.seed, **training,
                "eval": [config.eval_per_digit, config.eval_plain_per_digit, config.eval_steps,
                         num(config.guidance_scale)]}

    def run_id(self, config: StudyConfig) -> str:
        blob = json.dumps(self.key(config), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def method_spec(config: StudyConfig, method: str, style: str, seed: int, lr: float, *,
                fraction: float | None = None, rank_lambda: float | None = None, prior: bool = False) -> RunSpec:
    """The spec of ``method`` with the study's defaults for the settings that apply to it."""
    frac = (config.fraction if fraction is None else fraction) if method in SELECTION_METHODS else math.nan
    lam = config.method_lambda[method] if rank_lambda is None else rank_lambda
    if method == "sara" and lam == 0:  # SaRA with λ = 0 *is* the no-nuclear ablation: one run, not two
        method = "sara_no_nuclear"
    return RunSpec(method, style, seed, float(lr), float(frac), float(lam), bool(prior))


def pretrained_specs(config: StudyConfig) -> list[RunSpec]:
    pairs = {(s, seed) for s in config.styles for seed in config.seeds}
    pairs |= {(config.sweep_style, seed) for seed in config.sweep_seeds if config.sweep_fractions or
              config.sweep_lambdas}
    pairs |= set(config.lr_search_pairs) if _has_search(config) else set()
    pairs |= {(s, seed) for s in (*config.ablation_styles, *config.prior_styles) for seed in config.seeds}
    return [RunSpec(PRETRAINED, s, seed) for s, seed in sorted(pairs)]


def _has_search(config: StudyConfig) -> bool:
    return any(len(lrs) > 1 for lrs in config.lrs.values())


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def _candidate_scores(config: StudyConfig, method: str, lrs, by_id) -> dict[float, float] | None:
    """Per learning rate, VLHI among the candidates, averaged over the search pairs (None: runs missing).

    A candidate that diverged on any pair is out.
    """
    from ..world.metrics import vlhi

    per_pair = []
    for style, seed in config.lr_search_pairs:
        rows = []
        for lr in lrs:
            rid = method_spec(config, method, style, seed, lr).run_id(config)
            if by_id is None or rid not in by_id.index:
                return None
            row = by_id.loc[rid]
            if row["status"] == "ok" and math.isfinite(row["fid"]) and math.isfinite(row["agreement"]):
                rows.append((lr, row["fid"], row["agreement"]))
        scores = vlhi([r[1] for r in rows], [r[2] for r in rows]) if len(rows) > 1 else [1.0] * len(rows)
        per_pair.append({r[0]: float(v) for r, v in zip(rows, scores)})
    ok = [lr for lr in lrs if all(lr in d for d in per_pair)]
    return {lr: sum(d[lr] for d in per_pair) / len(per_pair) for lr in ok}


def _best(scores: dict[float, float], lrs) -> float:
    if not scores:
        return min(lrs)  # every candidate diverged: the smallest is the least bad
    return max(scores, key=lambda lr: (round(scores[lr], 9), -lr))  # ties go to the smaller rate


def lr_candidates(config: StudyConfig, results: pd.DataFrame | None) -> dict[str, list[float]]:
    """Per method, the learning rates the search has to try, given the results so far.

    The grid of ``config.lr_grid``, widened by one candidate (the grid's own
    ratio) on the side where the best candidate sits on the edge, up to
    ``config.lr_extensions`` times. A method whose candidates are not all
    run yet keeps its current list.
    """
    by_id = results.set_index("run_id") if results is not None and len(results) else None
    out = {}
    for m in config.methods:
        lrs = sorted(config.lrs[m])
        if len(lrs) > 1:
            ratio = lrs[1] / lrs[0]
            for _ in range(config.lr_extensions):
                scores = _candidate_scores(config, m, lrs, by_id)
                if scores is None:
                    break
                best = _best(scores, lrs)
                if best == lrs[0]:
                    lrs = [_sig(lrs[0] / ratio), *lrs]
                elif best == lrs[-1]:
                    lrs = [*lrs, _sig(lrs[-1] * ratio)]
                else:
                    break
        out[m] = lrs
    return out


def lr_search_specs(config: StudyConfig, results: pd.DataFrame | None = None) -> list[RunSpec]:
    if not _has_search(config):
        return []
    candidates = lr_candidates(config, results)
    return [method_spec(config, m, style, seed, lr)
            for m in config.methods for lr in candidates[m] for style, seed in config.lr_search_pairs]


def choose_lrs(config: StudyConfig, results: pd.DataFrame) -> dict[str, float]:
    """Per method, the candidate learning rate with the best VLHI among that method's candidates.

    VLHI (:func:`sara_edu.world.metrics.vlhi`) balances style fit (FID) and prompt
    agreement, the paper's headline number; it is computed among a method's
    candidates on each search pair and averaged over the pairs. Diverged candidates
    are out. Ties go to the smaller rate. The ablations take SaRA's rate. Raises
    :class:`DataError` when a candidate has no row yet.
    """
    by_id = results.set_index("run_id") if len(results) else None
    candidates = lr_candidates(config, results)
    chosen = {}
    for m in config.methods:
        lrs = candidates[m]
        if len(lrs) == 1:
            chosen[m] = lrs[0]
            continue
        scores = _candidate_scores(config, m, lrs, by_id)
        if scores is None:
            raise DataError(f"the learning-rate search has no result yet for {m} at some of {lrs}: run the study")
        chosen[m] = _best(scores, lrs)
    for m in config.ablations:
        chosen[m] = chosen["sara"]
    return chosen


def main_specs(config: StudyConfig, lrs: dict[str, float]) -> list[RunSpec]:
    """Seed-major: every method, then the ablations, then the prior-preservation runs, seed by seed."""
    out = []
    for seed in config.seeds:
        out += [method_spec(config, m, style, seed, lrs[m]) for style in config.styles for m in config.methods]
        out += [method_spec(config, m, style, seed, lrs[m]) for style in config.ablation_styles
                for m in config.ablations]
        out += [method_spec(config, m, style, seed, lrs[m], prior=True) for style in config.prior_styles
                for m in config.prior_methods]
    return out


def sweep_specs(config: StudyConfig, lrs: dict[str, float]) -> dict[str, list[RunSpec]]:
    """SaRA's sensitivity: trained fraction (θ) and nuclear-norm weight λ, on one style."""
    out = {"sweep_fraction": [], "sweep_lambda": []}
    for seed in config.sweep_seeds:
        for f in config.sweep_fractions:
            out["sweep_fraction"].append(method_spec(config, "sara", config.sweep_style, seed, lrs["sara"],
                                                     fraction=f))
        for lam in config.sweep_lambdas:
            out["sweep_lambda"].append(method_spec(config, "sara", config.sweep_style, seed, lrs["sara"],
                                                   rank_lambda=lam))
    return out


_CACHE: dict = {}  # per process: base model, datasets, real images, pretrained plain samples


def _base_pipe(model):
    """The pretrained model (loaded once per process); ``model`` is a folder or None for the shipped one."""
    from ..world.model import load_pretrained

    key = ("pipe", str(model))
    if key not in _CACHE:
        _CACHE[key] = load_pretrained(model)
    return _CACHE[key]


def _cached(key, make: Callable):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


class _Recorded:
    """A training method that remembers what it trains right after it is attached.

    SaRA's progressive adjustment freezes part of its entries at half-time, so
    the count afterwards would understate what was trained.
    """

    def __init__(self, method):
        self.method, self.name = method, method.name
        self.trainable = 0

    def build_optimizer(self, unet, **kwargs):
        optimizer = self.method.build_optimizer(unet, **kwargs)
        self.trainable = int(self.method.trainable_parameters(unet))
        return optimizer

    def trainable_parameters(self, unet):
        return self.method.trainable_parameters(unet)


def make_method(spec: RunSpec, base_unet, config: StudyConfig):
    """The :class:`~sara_edu.training.TrainingMethod` for ``spec`` (fresh, unattached)."""
    from ..sara.selection import select_parameters
    from ..training.lora import ALL_TARGETS, LoRA, lora_rank_matching
    from ..training.method import FullFineTuning
    from ..training.sara import SaRA
    from ..training.selective import SelectiveFineTuning

    m = spec.method
    if m in ("sara", "sara_no_nuclear", "sara_no_progressive"):
        return SaRA(fraction=spec.fraction, rank_lambda=spec.rank_lambda, seed=spec.seed,
                    progressive_iter=None if m == "sara_no_progressive" else "half")
    if m == "selective":
        return SelectiveFineTuning(fraction=spec.fraction)
    if m == "lora_r4":
        return LoRA(rank=4)
    def sara_count():
        return _cached(("sara_count", spec.fraction, id(base_unet)),
                       lambda: select_parameters(base_unet, fraction=spec.fraction).total_selected)

    def attention_lora():  # the course's LoRA: rank-matched to SaRA's count on the attention projections
        return _cached(("lora_match", spec.fraction, id(base_unet)),
                       lambda: lora_rank_matching(base_unet, sara_count()))

    if m == "lora_matched":
        found = attention_lora()
        return LoRA(rank=found.rank, target_modules=found.target_modules, name=f"lora r={found.rank} (matched)")
    if m == "lora_everywhere":  # the same count, on every layer LoRA can adapt (convolutions included)
        found = _cached(("lora_everywhere", spec.fraction, id(base_unet)),
                        lambda: lora_rank_matching(base_unet, sara_count(), target_modules=ALL_TARGETS, widen=False))
        return LoRA(rank=found.rank, target_modules=found.target_modules,
                    name=f"lora r={found.rank} everywhere (matched)")
    if m == "sara_attention":  # SaRA where the course's LoRA trains, as many entries as that LoRA trains
        found = attention_lora()
        pattern = weights_of(found.target_modules)
        numel = sum(p.numel() for n, p in base_unet.named_parameters() if re.search(pattern, n))
        return SaRA(fraction=min(found.lora_parameters / numel, 0.999), target_modules=pattern,
                    rank_lambda=spec.rank_lambda, seed=spec.seed, name="sara_attention")
    if m == "full":
        return FullFineTuning()
    if m == "full_attention":  # dense training where the course's LoRA trains
        return FullFineTuning(target_modules=weights_of(attention_lora().target_modules), name="full_attention")
    raise ConfigError(f"unknown method {m!r}; choose from {list(METHOD_LABELS)}")


def weights_of(targets) -> str:
    """A regular expression for the weights of the modules LoRA's ``targets`` name (peft's suffix rule)."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"(^|\.)({names})\.weight$"


def _saved_file_bytes(method, unet) -> int:
    """Size of what the method ships: sparse values, the LoRA adapter, or the weights it trained (every one
    for full fine-tuning; the chosen modules' for full fine-tuning of some)."""
    from ..io import save_tensors
    from ..training.lora import LoRA, save_lora

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.safetensors"
        if isinstance(method, LoRA):
            save_lora(unet, path)
        elif hasattr(method, "save"):
            method.save(path)
        else:  # the parameters it trained: the whole UNet for full fine-tuning (its state dict holds no buffers)
            save_tensors(method.trained_state(unet), path)
        return path.stat().st_size


def _make_plain(method, unet) -> None:
    """After training: a plain model (SaRA/selective detached, LoRA merged) for fast sampling."""
    from ..training.lora import LoRA, merge_lora

    if isinstance(method, LoRA):
        merge_lora(unet)
    elif hasattr(method, "detach"):
        method.detach()


def _real(split, look, digits):
    from ..world.data import load_digits_images

    return _cached(("real", split, look, tuple(digits)), lambda: load_digits_images(split, look, digits))


def _generate(pipe, digits, style, n, config: StudyConfig, seed: int):
    from ..world.model import generate
    from ..world.text import make_prompt

    wanted = [d for d in digits for _ in range(n)]
    images = generate(pipe, [make_prompt(d, style) for d in wanted], steps=config.eval_steps, seed=seed,
                      guidance_scale=config.guidance_scale)
    return images, wanted


def evaluate_run(pipe, style: str, seed: int, config: StudyConfig, model=None) -> dict:
    """Style (seen digits), generalisation (unseen digits) and retention (plain prompts) numbers."""
    from ..world.classifier import load_classifier
    from ..world.data import FINETUNE_DIGITS, UNSEEN_DIGITS
    from ..world.metrics import fid_analogue, gated_prompt_agreement, kid_analogue, prompt_agreement

    clf = load_classifier()
    out = {}
    for prefix, digits in (("", FINETUNE_DIGITS), ("unseen_", UNSEEN_DIGITS)):
        fake, wanted = _generate(pipe, digits, style, config.eval_per_digit, config, seed)
        real, _, _ = _real("heldout", style, digits)
        scores = (gated_prompt_agreement if prefix == "" else prompt_agreement)(fake, wanted, style, clf)
        out[f"{prefix}fid"] = fid_analogue(real, fake, clf)
        for k in ("digit_acc", "look_acc", "agreement"):
            out[f"{prefix}{k}"] = scores[k]
        if prefix == "":  # the unbiased KID, the gate; and what a perfect model scores: real training images
            out.update(kid=kid_analogue(real, fake, clf), gate_pass=scores["gate_pass"],
                       gated_agreement=scores["gated_agreement"])
            train, labels, _ = _real("train", style, digits)
            floor = torch.cat([train[labels == d][:config.eval_per_digit] for d in digits])
            out["fid_floor"] = _cached(("floor", style, config.eval_per_digit),
                                       lambda: fid_analogue(real, floor, clf))
    plain_digits = tuple(range(10))
    fake, wanted = _generate(pipe, plain_digits, None, config.eval_plain_per_digit, config, seed)
    before = _cached(("plain_before", str(model), seed, config.eval_plain_per_digit, config.eval_steps,
                      config.guidance_scale),
                     lambda: _generate(_base_pipe(model), plain_digits, None, config.eval_plain_per_digit,
                                       config, seed)[0])
    real, _, _ = _real("heldout", "plain", plain_digits)
    scores = prompt_agreement(fake, wanted, None, clf)
    out.update(plain_fid=fid_analogue(real, fake, clf), plain_digit_acc=scores["digit_acc"],
               plain_agreement=scores["agreement"],
               plain_drift=float((fake - before).abs().mean()))  # same noise: 0 means unchanged samples
    return out


def run_one(spec: RunSpec, config: StudyConfig, model=None, on_trained: Callable | None = None) -> dict:
    """Train (unless ``spec`` is the pretrained reference) and evaluate one run; return its CSV row.

    ``on_trained(pipe)``: called with the trained (merged, plain) pipeline before it is
    evaluated, e.g. to draw samples from it (:mod:`sara_edu.study.samples`).
    """
    from ..measure.memory import MB, MemoryTracker
    from ..training.loop import train
    from ..training.lora import LoRA
    from ..world.data import StyleDataset, with_plain_prompts

    base = _base_pipe(model)
    pipe = copy.deepcopy(base)
    row = {"run_id": spec.run_id(config), "study": config.name, "method": spec.method, "style": spec.style,
           "seed": spec.seed, "lr": spec.lr, "prior": int(spec.prior), "fraction": spec.fraction,
           "rank_lambda": spec.rank_lambda,
           "steps": 0, "batch_size": 0, "limit_per_digit": 0, "eval_per_digit": config.eval_per_digit,
           "eval_plain_per_digit": config.eval_plain_per_digit, "eval_steps": config.eval_steps,
           "guidance_scale": config.guidance_scale, "status": "ok", "n_train_images": 0,
           "trainable_params": 0, "theta": math.nan, "lora_rank": 0, "lora_targets": "",
           "final_loss": math.nan, "peak_memory_mb": math.nan, "step_time_s": math.nan,
           "train_time_s": 0.0, "file_size_bytes": 0, "threads": torch.get_num_threads(), "machine": machine()}
    if spec.method != PRETRAINED:
        method = make_method(spec, base.unet, config)
        dataset = _cached(("data", spec.style, config.limit_per_digit),
                          lambda: StyleDataset(spec.style, split="train", limit_per_digit=config.limit_per_digit))
        if spec.prior:
            dataset = _cached(("prior", spec.style, config.limit_per_digit, spec.seed),
                              lambda: with_plain_prompts(dataset, fraction=0.5, seed=spec.seed))
        recorded = _Recorded(method)
        tracker = MemoryTracker(model=pipe.unet)

        def stop_tracking(step, pipe, optimizer):  # count memory over the first steps only
            if step == TRACKED_STEPS:
                tracker.stop()

        row.update(steps=config.steps, batch_size=config.batch_size, limit_per_digit=config.limit_per_digit,
                   n_train_images=len(dataset))
        start = time.perf_counter()
        try:
            with tracker:
                history = train(pipe, dataset, tracker.watching(recorded), steps=config.steps, lr=spec.lr,
                                batch_size=config.batch_size, seed=spec.seed, progress=False,
                                callback=stop_tracking)
        except FloatingPointError:  # a too-large learning rate: a result of the search, not a crash
            row.update(status="diverged", train_time_s=time.perf_counter() - start,
                       trainable_params=recorded.trainable, finished_utc=_now())
            return {c: row.get(c, math.nan) for c in SCHEMA}
        row["train_time_s"] = time.perf_counter() - start
        report = tracker.report(pipe.unet)
        selection = getattr(getattr(method, "optimizer", None), "selection", None)
        timed = history.step_time_s.iloc[TRACKED_STEPS:] if len(history) > TRACKED_STEPS else history.step_time_s
        row.update(trainable_params=recorded.trainable, peak_memory_mb=report.peak_above_frozen / MB,
                   step_time_s=float(timed.median()), final_loss=float(history.loss.tail(10).mean()),
                   file_size_bytes=_saved_file_bytes(method, pipe.unet),
                   theta=max(selection.thresholds.values()) if selection is not None else math.nan,
                   lora_rank=getattr(method, "rank", 0) if isinstance(method, LoRA) else 0,
                   lora_targets=",".join(method.target_modules) if isinstance(method, LoRA) else "")
        _make_plain(method, pipe.unet)
    if on_trained is not None:
        on_trained(pipe)
    start = time.perf_counter()
    row.update(evaluate_run(pipe, spec.style, spec.seed, config, model))
    row.update(eval_time_s=time.perf_counter() - start, finished_utc=_now())
    return {c: row.get(c, math.nan) for c in SCHEMA}


def machine() -> str:
    """One line naming the hardware a run used (the report states it)."""
    import platform

    device = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {device}, "
            f"torch {torch.__version__}")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _worker_init(threads: int | None):
    if threads:
        torch.set_num_threads(threads)


def _worker_run(spec, config, model):
    return run_one(spec, config, model)


class _Runner:
    """Runs specs (in this process or a pool), skipping finished ones, saving the CSV after each run."""

    def __init__(self, config, out, model, workers, threads, progress, reuse=()):
        self.config, self.out, self.model = config, Path(out), model
        self.workers, self.threads, self.progress = workers, threads, progress
        self.results = read_results(self.out)
        # rows of other studies' files whose run_id (a hash of everything that decides the result) matches:
        # the same code on the same key gives the same row, so they are copied instead of trained again
        found = [read_results(Path(p)) for p in reuse]
        found = [f for f in found if len(f)]
        self.reuse = (pd.concat(found, ignore_index=True).drop_duplicates("run_id").set_index("run_id")
                      if found else None)
        self.bar = None
        self.pool = None

    def _tag(self, run_id, phase) -> bool:
        """Add ``phase`` to an existing row's phases; True if the run is already done."""
        hit = self.results.index[self.results.run_id == run_id]
        if len(hit) == 0:
            return False
        phases = str(self.results.at[hit[0], "phase"]).split("+")
        if phase not in phases:
            self.results.at[hit[0], "phase"] = "+".join(phases + [phase])
            write_results(self.results, self.out)
        return True

    def _save(self, row, phase):
        row = dict(row, phase=phase)
        new = pd.DataFrame([row], columns=list(SCHEMA))
        self.results = new if len(self.results) == 0 else pd.concat([self.results, new], ignore_index=True)
        write_results(self.results, self.out)

    def run(self, phased: list[tuple[str, RunSpec]]):
        todo, seen = [], set()
        for phase, spec in phased:
            rid = spec.run_id(self.config)
            if self._tag(rid, phase) or rid in seen:
                continue
            if self.reuse is not None and rid in self.reuse.index:
                # tagged "reused": the report counts its run time apart (it was spent by the other study)
                self._save(dict(self.reuse.loc[rid].to_dict(), run_id=rid, study=self.config.name), phase + "+reused")
                continue
            seen.add(rid)
            todo.append((phase, spec))
        if self.bar is not None:
            self.bar.total += len(todo)
            self.bar.refresh()
        if not todo:
            return
        if self.workers <= 1:
            for phase, spec in todo:
                self._describe(spec)
                self._save(run_one(spec, self.config, self.model), phase)
                self._advance()
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        pending = {self.pool.submit(_worker_run, spec, self.config, self.model): (phase, spec)
                   for phase, spec in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                phase, spec = pending.pop(fut)
                self._save(fut.result(), phase)  # an exception here stops the study; finished rows stay
                self._describe(spec)
                self._advance()

    def _describe(self, spec):
        if self.bar is not None:
            self.bar.set_postfix_str(f"{spec.method} / {spec.style} / seed {spec.seed}", refresh=False)

    def _advance(self):
        if self.bar is not None:
            self.bar.update(1)


def _phase(spec: RunSpec) -> str:
    return "prior" if spec.prior else "main"


def run_study(config: StudyConfig = FULL, out="reports/study_results.csv", model=None, workers: int = 1,
              threads: int | None = None, progress: bool = True, reuse=()) -> pd.DataFrame:
    """Run (or resume) every run of ``config``; return the results table (also in ``out``).

    ``model``: folder of the pretrained model (default: the shipped one).
    ``workers``: processes running runs side by side (each with ``threads``
    torch threads); small models use two 1-thread processes on a 2-core CPU
    better than one 2-thread process. Runs already in ``out`` are skipped.
    ``reuse``: other results files; a run found there under the same run_id
    (same method, style, seed, settings and evaluation) is copied, not rerun.
    """
    from tqdm.auto import tqdm

    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    _base_pipe(model)  # fail early (and clearly) if the model is missing
    missing = [str(p) for p in reuse if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"reuse names results files that do not exist: {missing}; give existing CSVs or drop them")
    runner = _Runner(config, out, model, workers, threads, progress, reuse)
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        runner.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                          initargs=(threads,))
    elif threads:
        torch.set_num_threads(threads)
    runner.bar = tqdm(total=0, desc=f"study ({config.name})", unit="run", disable=not progress)
    try:
        runner.run([("pretrained", s) for s in pretrained_specs(config)])
        while True:  # the search widens its grid while a best candidate sits on an edge
            specs = lr_search_specs(config, runner.results)
            runner.run([("lr_search", s) for s in specs])
            if lr_search_specs(config, runner.results) == specs:
                break
        lrs = choose_lrs(config, runner.results)
        sweeps = [(phase, s) for phase, specs in sweep_specs(config, lrs).items() for s in specs]
        main = main_specs(config, lrs)  # seed-major: an interrupted study has whole seeds
        last = config.seeds[-1]
        # the sweeps before the last seed, so a study cut short still has both the figure and 2+ seeds
        runner.run([(_phase(s), s) for s in main if s.seed != last] + sweeps +
                   [(_phase(s), s) for s in main if s.seed == last])
    finally:
        runner.bar.close()
        if runner.pool is not None:
            runner.pool.shutdown(wait=False, cancel_futures=True)
    return runner.results
