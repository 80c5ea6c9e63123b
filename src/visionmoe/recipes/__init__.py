"""Paper pipelines (glue only)."""
