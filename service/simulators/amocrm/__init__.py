"""The amoCRM API v4 simulator."""
