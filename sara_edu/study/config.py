"""What the study runs: methods, settings, the grid, and the results CSV's schema.

Shared by :mod:`.run` (which writes the CSV) and :mod:`.report` (which reads
it), so neither imports the other.
"""
from __future__ import annotations

import csv

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, DataError

#: Method keys, in table order, with the label the report prints.
METHOD_LABELS = {
    "sara": "SaRA",
    "sara_no_nuclear": "SaRA w/o nuclear norm",
    "sara_no_progressive": "SaRA w/o progressive",
    "selective": "selective FT (no UB)",
    "lora_r4": "LoRA r=4",
    "lora_matched": "LoRA rank-matched",
    "full": "full fine-tuning",
    "sara_attention": "SaRA on attention (count-matched)",
    "lora_everywhere": "LoRA everywhere (rank-matched)",
    "full_attention": "full FT of attention",
}

#: The controls that separate *where* a method trains from *how*: (where, how) per method. The course's LoRA
#: adapts the attention projections (to_q/k/v/out) only, SaRA and full fine-tuning the whole UNet.
WHERE_HOW = {
    "sara": ("everywhere", "sparse"), "sara_attention": ("attention", "sparse"),
    "lora_everywhere": ("everywhere", "low-rank"), "lora_matched": ("attention", "low-rank"),
    "lora_r4": ("attention", "low-rank"), "full": ("everywhere", "dense"), "full_attention": ("attention", "dense"),
}
CONTROLS = ("sara_attention", "lora_everywhere", "full_attention")


#: The reference row: the pretrained model, not fine-tuned (evaluated like every run).
PRETRAINED = "pretrained"


#: SaRA without one of its parts: trained at SaRA's chosen learning rate.
ABLATIONS = ("sara_no_nuclear", "sara_no_progressive")


SELECTION_METHODS = ("sara", "sara_no_nuclear", "sara_no_progressive", "selective", "lora_matched",
                     "sara_attention", "lora_everywhere", "full_attention")


NUCLEAR_METHODS = ("sara", "sara_no_progressive", "sara_attention")


TRACKED_STEPS = 2  # memory is counted over attach + these first steps (the tracker slows ops down)


#: Every column of the results CSV and its type ("str", "int", "float"), in file order.
SCHEMA = {
    # what ran
    "run_id": "str", "study": "str", "phase": "str", "method": "str", "style": "str", "seed": "int",
    "lr": "float", "prior": "int", "fraction": "float", "rank_lambda": "float", "steps": "int", "batch_size": "int",
    "limit_per_digit": "int", "eval_per_digit": "int", "eval_plain_per_digit": "int", "eval_steps": "int",
    "guidance_scale": "float",
    # training and its cost
    "status": "str", "n_train_images": "int", "trainable_params": "int", "theta": "float",
    "lora_rank": "int", "lora_targets": "str", "final_loss": "float", "peak_memory_mb": "float",
    "step_time_s": "float", "train_time_s": "float", "file_size_bytes": "int",
    # the trained style on the fine-tuning digits (the paper's Table 1)
    "fid": "float", "fid_floor": "float", "digit_acc": "float", "look_acc": "float", "agreement": "float",
    # the same, with the KID analogue and the quality gate (sara_edu.world.quality)
    "kid": "float", "gate_pass": "float", "gated_agreement": "float",
    # generalisation: the style on digits left out of fine-tuning
    "unseen_fid": "float", "unseen_digit_acc": "float", "unseen_look_acc": "float", "unseen_agreement": "float",
    # retention: plain prompts after fine-tuning
    "plain_fid": "float", "plain_digit_acc": "float", "plain_agreement": "float", "plain_drift": "float",
    # bookkeeping
    "eval_time_s": "float", "threads": "int", "machine": "str", "finished_utc": "str",
}


_PANDAS_DTYPES = {"str": "str", "int": "int64", "float": "float64"}

#: Columns added after the committed study was run: a file without them reads them as NaN (not measured then).
LATER_COLUMNS = ("kid", "gate_pass", "gated_agreement")


def read_results(path) -> pd.DataFrame:
    """The results CSV as a DataFrame with :data:`SCHEMA`'s columns and types (empty if no file)."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=_PANDAS_DTYPES[t]) for c, t in SCHEMA.items()})
    try:
        _check_row_lengths(path)
        df = pd.read_csv(path, dtype={c: str for c, t in SCHEMA.items() if t == "str"}, keep_default_na=False,
                         na_values={c: ["", "nan", "NaN"] for c, t in SCHEMA.items() if t != "str"})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a readable study CSV ({e}); delete it (the study re-runs everything) "
                        "or restore it from git") from e
    for col in LATER_COLUMNS:
        if col not in df.columns:
            df[col] = float("nan")
    missing = [c for c in SCHEMA if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks the study columns {missing[:5]}{'...' if len(missing) > 5 else ''}: it was "
                        "written by another version of sara_edu.study. Move it away and re-run the study.")
    df = df[list(SCHEMA)]
    for col, kind in SCHEMA.items():
        if kind == "str":
            df[col] = df[col].astype("str")
            continue
        numbers = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & numbers.isna() if kind == "float" else numbers.isna() | (numbers % 1 != 0)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}, line {row + 2}: column {col!r} holds {df[col].iloc[row]!r}, not "
                            f"{'an integer' if kind == 'int' else 'a number'}. Fix or delete that line (the study "
                            "runs a deleted run again when resumed), or restore the file from git.")
        df[col] = numbers.astype("float64" if kind == "float" else "int64")
    return df


def _check_row_lengths(path: Path) -> None:
    """Refuse a row with more or fewer fields than the header (a cut last row: an interrupted copy or edit).

    pandas would fill the missing fields with NaN, or fail later on a type, without naming the line.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        for row in rows:
            if row and header is not None and len(row) != len(header):
                cut = " (it is cut short" + (": the file ends there" if f.read(1) == "" else "") + ")" \
                    if len(row) < len(header) else ""
                raise DataError(f"{path}, line {rows.line_num}: {len(row)} fields where the header has "
                                f"{len(header)}{cut}. Delete that line (the study runs that run again when "
                                "resumed), or restore the file from git.")


def write_results(df: pd.DataFrame, path) -> Path:
    """Write the results atomically (the previous file stays intact until the new one is complete)."""
    from ..io import atomic_write_bytes

    df = df[list(SCHEMA)]
    return atomic_write_bytes(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))


@dataclass(frozen=True)
class StudyConfig:
    """Which runs make up a study, and how each is trained and evaluated.

    ``lr_grid``: per method, the learning rates the search starts from (the
    same number of candidates for every method; one candidate means no search).
    The search runs on every (style, seed) of ``lr_search_pairs`` and picks, per
    method, the candidate with the best VLHI among that method's candidates,
    averaged over the pairs. When the best candidate is the smallest or largest
    one tried, the grid grows by one more candidate on that side (the grid's own
    spacing), up to ``lr_extensions`` times per method, so that the choice is
    not an edge of the grid.

    ``ablations``: SaRA without one of its parts. They train at SaRA's chosen
    rate (an ablation changes one thing) on ``ablation_styles`` x ``seeds``.
    ``prior_methods``: the retention lesson: these methods again, at their
    chosen rates, with plain prompts mixed into the style set
    (:func:`~sara_edu.world.data.with_plain_prompts`), on ``prior_styles`` x ``seeds``.
    """

    name: str
    methods: tuple[str, ...] = tuple(METHOD_LABELS)
    styles: tuple[str, ...] = ("barbiecore", "cyberpunk", "elementfire", "expedition", "hornify")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100
    batch_size: int = 16
    limit_per_digit: int = 8
    fraction: float = 0.1  # SaRA's (and selective's) trained fraction; LoRA rank-matched to it
    rank_lambda: float = 5e-4  # the authors' λ
    lr_grid: tuple[tuple[str, tuple[float, ...]], ...] = ()
    lr_search_pairs: tuple[tuple[str, int], ...] = (("cyberpunk", 0),)
    lr_extensions: int = 2
    ablations: tuple[str, ...] = ()
    ablation_styles: tuple[str, ...] = ()
    prior_methods: tuple[str, ...] = ()
    prior_styles: tuple[str, ...] = ()
    sweep_fractions: tuple[float, ...] = ()
    sweep_lambdas: tuple[float, ...] = ()
    sweep_style: str = "cyberpunk"
    sweep_seeds: tuple[int, ...] = (0,)
    eval_per_digit: int = 6  # samples per digit for the style (seen and unseen digits)
    eval_plain_per_digit: int = 4  # samples per digit for the plain prompts (retention)
    eval_steps: int = 20  # DDIM steps
    guidance_scale: float = 3.0
    notes: str = ""  # for the report: what this grid leaves out and why (not part of any run's settings)

    def __post_init__(self):
        from ..world.text import STYLES

        unknown = [m for m in self.methods if m not in METHOD_LABELS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {list(METHOD_LABELS)}")
        bad = [s for s in (*self.styles, *(p[0] for p in self.lr_search_pairs), *self.ablation_styles,
                           *self.prior_styles, self.sweep_style) if s not in STYLES]
        if bad or not self.styles:
            raise ConfigError(f"unknown style(s) {bad}; choose from {list(STYLES)}")
        seeds = (*self.seeds, *self.sweep_seeds, *(p[1] for p in self.lr_search_pairs))
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
            raise ConfigError(f"seeds must be non-negative integers, got seeds={self.seeds}, sweep_seeds="
                              f"{self.sweep_seeds}, lr_search_pairs={self.lr_search_pairs}")
        for name in ("steps", "batch_size", "limit_per_digit", "eval_per_digit", "eval_plain_per_digit",
                     "eval_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.eval_per_digit * 3 < 2:  # FID on the 3 unseen digits needs 2 images
            raise ConfigError("eval_per_digit must be >= 1")
        if not 0 < self.fraction < 1 or any(not 0 < f < 1 for f in self.sweep_fractions):
            raise ConfigError("fractions must lie strictly between 0 and 1")
        if self.rank_lambda < 0 or any(v < 0 for v in self.sweep_lambdas):
            raise ConfigError("rank_lambda values must be >= 0")
        if not self.lr_search_pairs:
            raise ConfigError("lr_search_pairs needs at least one (style, seed) pair")
        if not isinstance(self.lr_extensions, int) or self.lr_extensions < 0:
            raise ConfigError(f"lr_extensions must be a non-negative integer, got {self.lr_extensions!r}")
        wrong = [m for m in self.ablations if m not in ABLATIONS]
        if wrong or (self.ablations and not self.ablation_styles) or (self.ablations and "sara" not in self.methods):
            raise ConfigError(f"ablations {self.ablations} need 'sara' in methods, ablation_styles, and come from "
                              f"{list(ABLATIONS)}")
        wrong = [m for m in self.prior_methods if m not in self.methods]
        if wrong or (self.prior_methods and not self.prior_styles):
            raise ConfigError(f"prior_methods {self.prior_methods} must be among methods {self.methods} and need "
                              "prior_styles")
        grid = dict(self.lr_grid)
        for m in self.methods:
            if not grid.get(m) or any(not lr > 0 for lr in grid[m]):
                raise ConfigError(f"lr_grid needs positive learning rates for {m!r}")
        sizes = {len(grid[m]) for m in self.methods}
        if len(sizes) > 1:
            raise ConfigError(f"every method must get the same number of learning-rate candidates, got {sizes}")
        if (self.sweep_fractions or self.sweep_lambdas) and "sara" not in self.methods:
            raise ConfigError("the sensitivity sweeps vary SaRA: include 'sara' in methods")

    @property
    def lrs(self) -> dict[str, tuple[float, ...]]:
        return dict(self.lr_grid)

    @property
    def method_lambda(self) -> dict[str, float]:
        return {m: (self.rank_lambda if m in NUCLEAR_METHODS else 0.0 if m == "sara_no_nuclear" else math.nan)
                for m in METHOD_LABELS}


#: The study committed in reports/ (about 2 hours of a 2-core CPU; resumable).
#: The budget: reports/budget.csv (``python -m sara_edu.study budget``) has full
#: fine-tuning at lr 3e-4 reach style agreement >= 0.8 on every style by step 700;
#: 800 steps leave a margin. Progressive adjustment at half of it (step 400), as the
#: authors do. The nuclear-norm term penalises one random eligible matrix per step
#: (the authors' schedule): 800 steps over the course model's 83 matrices is about
#: 10 penalised steps per matrix.
FULL = StudyConfig(
    name="full", methods=("sara", "lora_matched", "full"), steps=800, batch_size=16, limit_per_digit=8,
    lr_grid=(("sara", (3e-4, 1e-3, 3e-3)), ("lora_matched", (1e-4, 3e-4, 1e-3)), ("full", (1e-4, 3e-4, 1e-3))),
    lr_search_pairs=(("elementfire", 0), ("hornify", 1)),
    ablations=ABLATIONS, ablation_styles=("hornify",),
    prior_methods=("sara", "lora_matched", "full"), prior_styles=("cyberpunk",),
    eval_per_digit=6, eval_plain_per_digit=3, eval_steps=20,
    notes=("**Protocol.** 800 training steps of batch 16 on 56 images per style (8 per digit 0-6): the "
           "budget at which full fine-tuning learns every style (reports/budget.csv). Learning rates: a "
           "3-point grid per method, a factor 3 apart, searched on two (style, seed) pairs (elementfire seed 0, "
           "hornify seed 1, the two slowest styles), widened automatically while the best candidate sits on "
           "the grid's edge. Every method then trains on the 5 styles x 3 seeds at its chosen rate. The "
           "ablations (SaRA without the nuclear norm, without progressive adjustment) train at SaRA's rate on "
           "hornify (the style full fine-tuning learns last) x 3 seeds. For the retention lesson, SaRA, LoRA "
           "(rank-matched to SaRA's trained count, as in notebook 04) and full fine-tuning train again on "
           "cyberpunk x 3 seeds with plain digits mixed in (a third of the set, prior preservation). Selective fine-tuning without unstructured backpropagation computes the "
           "same updates as SaRA without progressive adjustment (it differs only in memory), so it is not run "
           "again; its memory is in benchmarks/. Evaluation: 6 samples per digit (42 images for digits 0-6, "
           "18 for the unseen 7-9), 3 per digit for the plain prompts (30 images), 20 DDIM steps. The runs "
           "went two at a time (two 1-thread processes); step times compare methods only."))


#: What the committed study (reports/study_results.csv) chose per method: its learning-rate search's
#: result, kept here so that notebook 04 and a wheel without reports/ use the same rates.
#: tests/study/test_committed_study.py checks it against the CSV.
CHOSEN_LRS = {"sara": 1e-3, "lora_matched": 3e-3, "full": 3e-4}

#: Notebook 04's method labels -> the study's methods.
NOTEBOOK_METHODS = {"SaRA": "sara", "LoRA": "lora_matched", "full fine-tuning": "full"}


#: CI's reduced grid: three methods, one style, one seed, a few steps, tiny evaluation, no search.
QUICK = StudyConfig(
    name="quick", methods=("sara", "lora_r4", "full"), styles=("cyberpunk",), seeds=(0,), steps=6, batch_size=8,
    limit_per_digit=4, lr_grid=(("sara", (3e-3,)), ("lora_r4", (3e-3,)), ("full", (3e-4,))), eval_per_digit=2,
    eval_plain_per_digit=1, eval_steps=4,
    notes="The QUICK grid checks that the machinery works end to end; its numbers mean nothing.")


#: Issue 18's controls, not run yet: where a method trains (the attention projections / the whole UNet) crossed
#: with how (sparse / low-rank / dense), each at its own searched rate, 5 seeds. About 240 runs of ~2.6 min:
#: some 10 CPU-hours, 5 h wall with two workers on the 2-core box (``python -m sara_edu.study run --study
#: controls``, into reports/controls_results.csv). Same training and evaluation settings as FULL.
CONTROLS_STUDY = StudyConfig(
    name="controls", methods=("sara", "sara_attention", "lora_matched", "lora_r4", "lora_everywhere", "full",
                              "full_attention"),
    seeds=(0, 1, 2), steps=800, batch_size=16, limit_per_digit=8,
    # sara, lora_matched and full keep FULL's grids, so their runs are FULL's own (copied by run_id, not rerun)
    lr_grid=(("sara", (3e-4, 1e-3, 3e-3)), ("sara_attention", (3e-4, 1e-3, 3e-3)),
             ("lora_matched", (1e-4, 3e-4, 1e-3)), ("lora_r4", (1e-3, 3e-3, 1e-2)),
             ("lora_everywhere", (1e-3, 3e-3, 1e-2)), ("full", (1e-4, 3e-4, 1e-3)),
             ("full_attention", (1e-4, 3e-4, 1e-3))),
    lr_search_pairs=(("elementfire", 0), ("hornify", 1)),
    eval_per_digit=6, eval_plain_per_digit=3, eval_steps=20,
    notes=("**Controls.** The course's LoRA adapts the attention projections only, SaRA and full fine-tuning "
           "the whole UNet. Here every method also trains in the other place: SaRA on the attention "
           "projections with as many entries as the rank-matched LoRA trains, LoRA on every layer it can adapt "
           "(ResNet convolutions included) rank-matched to SaRA's count, and full fine-tuning of the attention "
           "projections' weights; LoRA r=4 (the diffusers default) on attention. Each method at its own "
           "searched rate (FULL's search, the same grids and pairs), then 5 styles x 3 seeds (15 pairs per "
           "comparison; the four new methods' 82 runs took 276 min of run time, seed 0 in one session and "
           "seeds 1-2 in the next), otherwise FULL's protocol. The runs of SaRA, the rank-matched LoRA and full fine-tuning have the same "
           "run_id (a hash of method, style, seed, settings and evaluation) as the full study's, so they "
           "are copied from reports/study_results.csv, not trained again."))


#: What the committed controls study (reports/controls_results.csv) chose for its new methods (its search's
#: result); tests/study/test_committed_study.py checks it against the CSV.
CONTROLS_CHOSEN_LRS = {"sara_attention": 1e-3, "lora_r4": 3e-3, "lora_everywhere": 1e-3, "full_attention": 1e-3}


#: The named studies (``StudyConfig.name`` -> config), e.g. for the report's notes.
CONFIGS = {c.name: c for c in (FULL, QUICK, CONTROLS_STUDY)}


def results_csv(config: StudyConfig) -> str:
    """Where a study's results live: ``reports/study_results.csv`` for the full study, else its own file
    (a report reads one study's rows); QUICK's under ``runs/``."""
    from ..world.paths import REPO_ROOT

    name = ("runs/study_quick.csv" if config is QUICK else "reports/study_results.csv" if config is FULL
            else f"reports/{config.name}_results.csv")
    return str(REPO_ROOT / name)
