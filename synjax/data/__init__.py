"""synjax.data."""
