"""``python -m patchcast``: the same CLI as the ``patchcast`` command."""

from patchcast.cli import main

raise SystemExit(main())
