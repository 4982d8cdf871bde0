"""``python -m mae``: the same as the ``mae`` command (this is what ``torchrun -m mae`` runs)."""

import sys

from mae.cli import main

sys.exit(main())
