"""``python -m fastmerge``: the same as the ``fastmerge`` command."""
from .cli import entry

entry()
