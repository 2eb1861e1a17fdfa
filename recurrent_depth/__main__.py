"""`python -m recurrent_depth ...` runs the `rdepth` CLI (for torchrun)."""

import sys

from recurrent_depth.cli.main import main

sys.exit(main())
