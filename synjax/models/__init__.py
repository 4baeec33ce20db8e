"""synjax.models."""
