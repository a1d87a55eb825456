"""``python -m ddpm_fast``: the ddpm-fast command line (also what ``torchrun -m ddpm_fast`` runs)."""

import sys

from .cli import main

sys.exit(main())
