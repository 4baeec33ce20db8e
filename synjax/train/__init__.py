"""synjax.train."""
