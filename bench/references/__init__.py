"""Reference relays the real relay is measured against (each is also a standalone script)."""
