"""circuits atlas service."""
