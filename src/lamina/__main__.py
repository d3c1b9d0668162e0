"""``python -m lamina``: the same as the ``lamina`` script."""

from lamina.cli import main

raise SystemExit(main())
