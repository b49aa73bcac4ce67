"""One module per ``regkl`` command; :mod:`regkl.cli` assembles them into the command group."""
