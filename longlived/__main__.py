"""``python -m longlived``: the same as the ``longlived`` command."""

from longlived.cli import main

raise SystemExit(main())
