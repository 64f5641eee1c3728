"""The paper's experiments (docs/ALGORITHM.md §4-6): which share of sparse parameters should be memory?

    budgets     named budgets: the pure-MoE run (rho = 1), the Engram template, the grids
    allocation  the rho solver: iso-parameter, iso-FLOP models that trade routed experts for table rows
    plan        PlannedRun and the plans (allocation, memory, ablation, init)
    runner      run directories, locks, resumable execution, worker processes
    stats       summaries, fits, bootstrap interval, seed-paired deltas, reading result.json files
    plots       the PNGs drawn from those statistics
    report      markdown tables, summary.json and runs.jsonl (``engram sweep report``)

Research code: it uses the library (config, model, train), and the library never imports it.
"""
