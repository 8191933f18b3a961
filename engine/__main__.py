"""`python -m engine` is the `seckill` command."""

import sys

from .cli import main

sys.exit(main())
