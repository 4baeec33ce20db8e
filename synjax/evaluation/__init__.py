"""synjax.evaluation."""
