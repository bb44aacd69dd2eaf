"""``python -m tokenwire_cli``: the ``tokenwire`` command."""

from tokenwire_cli import main

main()
