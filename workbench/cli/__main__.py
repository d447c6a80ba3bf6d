"""``python -m workbench.cli``: what torchrun and the tests start."""

import sys

from workbench.cli import main

sys.exit(main())
