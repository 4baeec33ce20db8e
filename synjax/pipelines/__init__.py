"""synjax.pipelines."""
