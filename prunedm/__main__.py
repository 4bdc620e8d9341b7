"""`python -m prunedm` runs the command-line interface."""

from prunedm.cli import main

raise SystemExit(main())
