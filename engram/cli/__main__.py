"""``python -m engram.cli`` (and ``torchrun -m engram.cli``)."""

import sys

from engram.cli import main

sys.exit(main())
