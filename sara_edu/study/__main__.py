"""``python -m sara_edu.study budget|run|report``: size the runs, run (or resume) the study, report it."""
from __future__ import annotations

import argparse
import os
import time

from ..world.paths import REPO_ROOT
from .config import CONFIGS, FULL, QUICK, results_csv
from .run import run_study


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sara_edu.study",
                                     description="Reproduce the paper's comparisons on the course model.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the study, appending one CSV row per run")
    run.add_argument("--quick", action="store_true", help="the reduced grid CI runs (a minute or two)")
    run.add_argument("--study", default=None, choices=sorted(set(CONFIGS) - {QUICK.name}),
                     help="which grid to run (default: full; 'controls': the where-vs-how controls, "
                          "~2.5 CPU-hours for its seed 0)")
    run.add_argument("--out", default=None,
                     help="results CSV (default reports/study_results.csv; with --quick runs/study_quick.csv)")
    run.add_argument("--model", default=None, help="pretrained model folder (default: the shipped model)")
    cores = os.cpu_count() or 1
    run.add_argument("--workers", type=int, default=min(2, cores),
                     help="runs side by side, in separate processes (default: 2, or 1 on a 1-core machine)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per run (default: the cores shared out between the workers)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--reuse", nargs="*", default=None,
                     help="results CSVs whose runs with the same run_id are copied instead of rerun "
                          "(default for --study controls: reports/study_results.csv)")
    rep = sub.add_parser("report", help="write the markdown report and figures from the CSV")
    rep.add_argument("--csv", default=str(REPO_ROOT / "reports" / "study_results.csv"))
    rep.add_argument("--out", default=str(REPO_ROOT / "reports" / "study.md"))
    rep.add_argument("--study", default=None, help="which study of the CSV to report (default: the only one)")
    sam = sub.add_parser("samples", help="retrain one (style, seed) per method and draw the sample grid the report "
                                         "shows beside its tables (and check the retrained numbers equal the CSV's)")
    sam.add_argument("--study", default="full", choices=sorted(set(CONFIGS) - {QUICK.name}))
    sam.add_argument("--csv", default=None, help="results CSV (default: the study's own in reports/)")
    sam.add_argument("--style", default="cyberpunk")
    sam.add_argument("--seed", type=int, default=0)
    sam.add_argument("--model", default=None, help="pretrained model folder (default: the shipped model)")
    bud = sub.add_parser("budget", help="full fine-tuning's style agreement along one run per style")
    bud.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400, 800], help="where to score the run")
    bud.add_argument("--lr", type=float, default=3e-4)
    bud.add_argument("--styles", nargs="*", default=None)
    bud.add_argument("--methods", nargs="*", default=None,
                     help="study methods to draw, each at the study's chosen rate (default: full at --lr)")
    bud.add_argument("--out", default=str(REPO_ROOT / "reports" / "budget.csv"))
    args = parser.parse_args(argv)
    if args.command == "budget":
        from .budget import main as budget_main

        budget_main(args)
    elif args.command == "samples":
        from .samples import write_samples

        config = CONFIGS[args.study]
        csv = args.csv or results_csv(config)
        for path in write_samples(config, csv, REPO_ROOT / "reports", style=args.style, seed=args.seed,
                                  model=args.model):
            print(f"wrote {path}")
    elif args.command == "run":
        if args.quick and args.study:
            parser.error(f"--quick runs the reduced grid; drop --study {args.study} (or --quick)")
        config = QUICK if args.quick else CONFIGS[args.study] if args.study else FULL
        out = args.out or results_csv(config)
        start = time.perf_counter()
        threads = args.threads or max(1, cores // max(args.workers, 1))
        reuse = args.reuse if args.reuse is not None else (
            [str(REPO_ROOT / "reports" / "study_results.csv")] if config.name == "controls" else [])
        results = run_study(config, out, model=args.model, workers=args.workers, threads=threads,
                            progress=not args.no_progress, reuse=reuse)
        print(f"{len(results[results.study == config.name])} runs of the {config.name!r} study in {out} "
              f"({time.perf_counter() - start:.0f} s this session)")
    else:
        from .report import write_report

        path = write_report(args.csv, args.out, study=args.study)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
