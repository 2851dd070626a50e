"""``python -m aigc.cli``: the ``aigc`` command."""

import sys

from aigc.cli import main

sys.exit(main())
