"""Checkpoint conversion and (later) training checkpoints."""
