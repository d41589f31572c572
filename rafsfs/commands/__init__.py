"""One module per ``rafsfs`` command: each has ``register(sub, parents)`` (its arguments, its help) and
``run(args) -> exit code``.  ``rafsfs.cli`` builds the parser from them and maps errors to exit codes.
``commands.mount`` is also where a mount mode is chosen (``select_mode``), for ``rafsfs-nydusd`` too."""
