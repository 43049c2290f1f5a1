"""``python -m keeper.wechat.simulator``: the same as ``keeper simulate``."""

import sys

from keeper.wechat.simulator.cli import main

sys.exit(main())
