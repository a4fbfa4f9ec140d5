"""``python -m loops_sdk.cli``: the ``loops`` command."""

import sys

from .main import main

sys.exit(main())
