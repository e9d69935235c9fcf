"""What runs inside Ray actors (or in one process without Ray)."""
