"""synjax.report."""
