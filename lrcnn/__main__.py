"""``python -m lrcnn ...`` is the ``planner`` command (also torchrun's target:
``torchrun --nproc-per-node 4 -m lrcnn run PLAN.json ...``)."""
import sys

from lrcnn.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
