"""The SQL the service runs: named queries and numbered migrations, read with importlib.resources."""
