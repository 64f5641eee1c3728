"""Tokens/s per Engram table tier vs device-resident. The benchmark ships in the package
(``engram/bench/offload.py``) so ``engram bench offload`` works anywhere; this is the same run."""

import sys

from engram.bench.offload import main

if __name__ == "__main__":
    sys.exit(main())
