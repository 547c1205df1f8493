"""circuits labeler service."""
