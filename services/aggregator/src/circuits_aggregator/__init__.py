"""circuits aggregator service."""
