"""The public code's way of doing each primitive, kept as benchmark baselines (never used by the package)."""
