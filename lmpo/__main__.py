"""``python -m lmpo``: the ``lmpo`` command (lmpo.cli)."""

from .cli import main

raise SystemExit(main())
