"""The research subcommands: ``demo`` (what ``make demo`` runs), ``bench offload`` and ``sweep``. Each runs
one research function; the tools load only when their command runs."""

from __future__ import annotations

from engram.cli.flags import add_set, directory, nonnegative_int, positive_int


def demo_flags(p) -> None:
    p.add_argument("--out", default=None, type=directory,
                   help="output directory (default runs/demo; runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (a few steps each)")
    p.add_argument("--seeds", type=positive_int, default=3, help="paired seeds: each trains both models (default 3)")
    p.add_argument("--first-seed", type=nonnegative_int, default=0, help="first seed (default 0)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes, one thread each when there are two (default: one per core, at most 2)")
    add_set(p, "override a field of every run, e.g. train.max_steps=100 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def demo(args) -> int:
    from engram.demo import run_demo

    run_demo(out_dir=args.out, overrides=args.overrides, quick=args.quick, progress=not args.no_progress,
             seeds=args.seeds, first_seed=args.first_seed, workers=args.workers)
    return 0


def bench_offload(args) -> int:
    from engram.bench.offload import main as offload

    try:
        return offload(args.passthrough, prog="engram bench offload")
    except SystemExit as exit_:  # the benchmark's own argparse: --help, or a refused flag (exit 2)
        return exit_.code if isinstance(exit_.code, int) else 2


def sweep_flags(p) -> None:
    p.add_argument("kind", choices=["allocation", "memory", "ablation", "init", "report"],
                   help="which sweep to run, or `report` to analyse the finished runs of a budget")
    p.add_argument("--budget", default="tiny", help="named budget (tiny runs on a CPU; small and medium are for GPUs; "
                                                    "default tiny)")
    p.add_argument("--first-seed", type=nonnegative_int, default=0,
                   help="first seed of the plan (default 0): e.g. choose on seeds 0-2, then confirm the choice "
                        "on fresh seeds with --seeds 3 --first-seed 3")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per grid point (default: the budget's)")
    p.add_argument("--points", nargs="+", default=None, metavar="POINT",
                   help="only these grid points (labels as --dry-run prints them), e.g. a choice and its reference")
    p.add_argument("--out", default="runs/sweeps", type=directory, help="sweep root; runs go to OUT/BUDGET/SWEEP/POINT/seedK "
                                                       "(default runs/sweeps)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="worker processes sharing the sweep (default 1); more processes may also be started by hand")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker (default: cores / workers)")
    add_set(p, "override a data/train field of every run, e.g. train.max_steps=20 (not model fields)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (the allocation table) and exit")
    p.add_argument("--report-dir", default="docs/results", type=directory, help="where `report` writes plots and tables "
                                                                "(default docs/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-summary", action="store_true", help="do not print the summary table at the end")


def sweep(args) -> int:
    from engram.sweeps.plan import describe_plan
    from engram.sweeps.report import format_summary, report_sweep
    from engram.sweeps.runner import run_sweep

    if args.kind == "report":
        tables, paths = report_sweep(args.budget, args.out, args.report_dir)
        print(tables)
        print("\n".join(f"wrote {p}" for p in paths.values()))
    elif args.dry_run:
        print(describe_plan(args.kind, args.budget, args.seeds, args.overrides, args.first_seed, args.points))
    else:
        results = run_sweep(args.kind, args.budget, args.seeds, args.out, workers=args.workers,
                            first_seed=args.first_seed, points=args.points,
                            threads=args.threads, overrides=args.overrides, progress=not args.no_progress)
        if results and not args.no_summary:
            print(format_summary(results))
    return 0
