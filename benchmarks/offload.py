"""Tokens/s per Engram table tier vs device-resident. The benchmark ships in the package
(``engram/experiments/offload_bench.py``) so ``engram bench offload`` works anywhere; this is the same run."""

import sys

from engram.experiments.offload_bench import main

if __name__ == "__main__":
    sys.exit(main())
