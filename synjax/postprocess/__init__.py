"""synjax.postprocess."""
