"""``python -m deit_registry.weights ...``: an alias of the ``deit-registry`` command line (one implementation),
kept so ``python -m deit_registry.weights convert SRC DST`` and ``... download NAME`` still work."""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main())
