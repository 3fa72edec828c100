"""The sample grid beside the study's tables: what its numbers score.

The study keeps numbers, not models. To show what a row of its tables scores,
``python -m sara_edu.study samples`` trains each method's run for one
(style, seed) again, at the rate and settings of the committed row (the same
``run_id``), draws one sample per digit 0-6 from it, marks each with the
quality gate's verdict and the classifier's, and scores the retrained run the
study's way: the retrained numbers must equal the CSV's (a reproducibility
check, written beside the grid).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import ConfigError
from .config import PRETRAINED, StudyConfig
from .figures import save_png
from .select import label

#: Written next to the report: the grid, and the retrained run's numbers against the CSV's.
SAMPLE_FILES = ("{study}_samples.png", "{study}_samples.csv")
CHECKED = ("agreement", "fid", "plain_agreement")  # compared with the committed row


def sample_paths(reports: Path, study: str) -> tuple[Path, Path]:
    return tuple(Path(reports) / f.format(study=study) for f in SAMPLE_FILES)


def committed_row(results: pd.DataFrame, method: str, style: str, seed: int) -> pd.Series:
    """The study's main-grid row for (method, style, seed); a clear error if there is none."""
    hit = results[(results.method == method) & (results["style"] == style) & (results.seed == seed) &
                  (results.prior == 0) & (results.status == "ok") &
                  results.phase.astype(str).str.contains("main|pretrained")]
    if hit.empty:
        raise ConfigError(f"no finished main-grid run of {method!r} on style={style!r}, seed={seed} in the results; "
                          "pick a (style, seed) the study ran (see its CSV) or run the study first")
    return hit.iloc[0]


def draw_samples(config: StudyConfig, results: pd.DataFrame, *, style: str, seed: int, methods=None,
                 model=None, progress: bool = True):
    """Retrain each method's (style, seed) run; return (figure, check table).

    ``methods``: which of the study's methods (default: all, the pretrained
    reference first). The check table has the CSV's and the retrained run's
    numbers for :data:`CHECKED` and each sample's verdicts.
    """
    import torch
    from tqdm.auto import tqdm

    from ..world.classifier import load_classifier
    from ..world.quality import judged_samples
    from .run import RunSpec, _base_pipe, method_spec, run_one

    methods = [PRETRAINED, *config.methods] if methods is None else list(methods)
    digits = list(range(7))
    clf = load_classifier()
    grid, checks = {}, []
    for method in tqdm(methods, desc="retraining for the sample grid", disable=not progress):
        row = committed_row(results, method, style, seed)
        spec = (method_spec(config, method, style, seed, float(row.lr)) if method != PRETRAINED
                else RunSpec(PRETRAINED, style, seed))
        if spec.run_id(config) != row.run_id:
            raise ConfigError(f"the {method!r} row's run_id {row.run_id} is not what {config.name!r} makes of it "
                              f"({spec.run_id(config)}): the CSV is from other settings; report that study instead")
        trained = []
        again = run_one(spec, config, model, on_trained=trained.append)
        pipe = trained[0] if trained else _base_pipe(model)  # the pretrained reference trains nothing
        images, passed, agrees = judged_samples(pipe, style, digits, seed=seed, steps=config.eval_steps,
                                                guidance_scale=config.guidance_scale, classifier=clf)
        name = label(method, results)
        grid[name] = (images, passed, agrees)
        checks.append({"method": method, "label": name, "run_id": row.run_id,
                       **{f"csv_{c}": float(row[c]) for c in CHECKED},
                       **{f"retrained_{c}": float(again[c]) for c in CHECKED},
                       "grid_pass": int(torch.as_tensor(passed).sum()),
                       "grid_agree": int(torch.as_tensor(agrees).sum()),
                       "grid_images": len(digits)})
    title = (f"'{style}', seed {seed}: one sample per digit 0-6 ({config.eval_steps} DDIM steps), "
             "pass/reject = quality gate, ✓/✗ = prompt agreement")
    return sample_figure(grid, title), pd.DataFrame(checks)


def sample_figure(rows: dict, suptitle: str):
    """``rows``: ``{label: (images, passed, agrees)}`` -> one row of tiles per label, each titled with its verdicts."""
    from ..world.quality import verdict_title
    from .figures import _figure

    labels = list(rows)
    per_row = max(len(r[0]) for r in rows.values())
    fig = _figure(figsize=(1.0 * per_row + 2.2, 1.05 * len(labels) + 0.5))
    axes = fig.subplots(len(labels), per_row, squeeze=False)
    for r, name in enumerate(labels):
        images, passed, agrees = rows[name]
        pictures = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(pictures):
                ax.imshow(pictures[c], interpolation="nearest")
                ax.set_title(verdict_title(passed[c], agrees[c]), fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    return fig


def write_samples(config: StudyConfig, csv, reports, *, style: str = "cyberpunk", seed: int = 0, model=None,
                  progress: bool = True) -> tuple[Path, Path]:
    """Draw and save the grid and the check table next to the report (``reports``)."""
    import torch

    from ..io import atomic_write_bytes
    from .config import read_results

    results = read_results(Path(csv))
    results = results[results.study == config.name]
    torch.set_num_threads(1)  # as the study's runs: one thread each, so the retrained numbers are the same
    fig, checks = draw_samples(config, results, style=style, seed=seed, model=model, progress=progress)
    png, table = sample_paths(Path(reports), config.name)
    save_png(fig, png)
    atomic_write_bytes(table, lambda tmp: checks.to_csv(tmp, index=False, float_format="%.6g"))
    return png, table


def samples_section(folders, study: str) -> list[str]:
    """The report's lines for the grid, from the first of ``folders`` that has it (the report's own, then the
    results CSV's); a line saying how to draw it if none has."""
    png, table = next((p for p in (sample_paths(Path(f), study) for f in folders) if p[0].exists() and p[1].exists()),
                      sample_paths(Path(folders[0]), study))
    if not (png.exists() and table.exists()):
        return [f"_No sample grid yet: `python -m sara_edu.study samples --study {study}` draws it._", ""]
    checks = pd.read_csv(table)
    worst = max(float(((checks[f"retrained_{c}"] - checks[f"csv_{c}"]).abs() /
                       checks[f"csv_{c}"].abs().clip(lower=1e-12)).max()) for c in CHECKED)
    tally = "; ".join(f"{r.label} {r.grid_pass}/{r.grid_images} pass, {r.grid_agree}/{r.grid_images} ✓"
                      for r in checks.itertuples())
    # the same run_id retrained in another process: equal up to float rounding (SaRA's FID here: 1.5e-4 relative)
    again = ("equal the CSV's" if worst == 0 else f"match the CSV's to within {worst:.2%}" if worst < 0.01 else
             f"differ from the CSV's by up to {worst:.1%} (not reproduced: read the grid with care)")
    return [f"![What the numbers score: one sample per digit and method]({png.name})", "",
            "What the tables score, for one (style, seed): each method's run trained again from its row's settings "
            f"(`python -m sara_edu.study samples --study {study}`); its retrained numbers ({', '.join(CHECKED)}) "
            f"{again}. In the grid: {tally}.", ""]
