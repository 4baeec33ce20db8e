"""synjax.inference."""
