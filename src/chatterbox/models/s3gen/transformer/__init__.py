"""Conformer pieces of the S3Gen flow encoder (`flow.encoder`)."""
