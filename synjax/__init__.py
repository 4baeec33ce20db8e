"""synjax: synapses and neurons in 3D microscopy volumes, with JAX and Flax."""

__version__ = "0.1.0"
