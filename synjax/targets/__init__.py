"""synjax.targets."""
