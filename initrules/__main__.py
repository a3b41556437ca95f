"""Run the command line: ``python -m initrules``."""

import sys

from initrules.cli import main

sys.exit(main())
