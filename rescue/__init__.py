"""beach-rescue: the WebSocket fallback relay and token service for Beach's terminal sessions."""

__version__ = "0.1.0"
