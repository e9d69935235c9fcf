"""The embedded demo's tiny world: a readable preference (descriptiveness) a tiny RM can learn."""
