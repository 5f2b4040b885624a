"""The Python SDK for beach-rescue peers (filled in as the parts land)."""
