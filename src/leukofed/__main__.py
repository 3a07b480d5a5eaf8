"""``python -m leukofed`` runs the CLI (the Snakemake rules use this, so no PATH set-up is needed)."""

import sys

from leukofed.cli import main

sys.exit(main())
