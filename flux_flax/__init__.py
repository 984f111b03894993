"""flux_flax."""
