"""synjax.detection."""
