"""`python -m engine` is the `seckill` command."""

import sys

from engine.cli import main

sys.exit(main())
