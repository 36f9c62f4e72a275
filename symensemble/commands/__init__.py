"""CLI commands, one module each (see ``symensemble.cli``)."""
