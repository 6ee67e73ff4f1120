"""`python -m fusion.convert ...`: the fusion-convert command."""

import sys

from fusion.convert.cli import main

sys.exit(main())
