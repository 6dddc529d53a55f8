"""``python -m deit_registry ...``: the same as the ``deit-registry`` console script."""

import sys

from .cli import main

sys.exit(main())
