"""Subcommands of the ``patchcast`` CLI, one module each (see :data:`patchcast.cli.COMMAND_MODULES`)."""
