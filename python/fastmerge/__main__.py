"""``python -m fastmerge``: the same as the ``fastmerge`` command."""
import sys

from .cli import main

sys.exit(main())
