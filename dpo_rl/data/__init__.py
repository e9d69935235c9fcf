"""Data the trainers read."""
