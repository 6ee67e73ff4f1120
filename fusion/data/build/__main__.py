"""`python -m fusion.data.build ...` runs `fusion-data ...`."""

import sys

from fusion.data.build.cli import main

sys.exit(main())
