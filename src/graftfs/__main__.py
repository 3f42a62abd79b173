"""Allow ``python -m graftfs`` (the daemon is started this way, with the same interpreter)."""

import sys

from graftfs.cli import main

sys.exit(main())
