"""``python -m cp_bench`` is ``cp-bench``."""

import sys

from cp_bench.cli import main

sys.exit(main())
