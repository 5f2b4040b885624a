"""Sub-commands of the ``rescue`` CLI, one module each (see rescue.cli)."""
