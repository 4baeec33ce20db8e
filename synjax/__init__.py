"""synjax: synapses and neurons in 3D microscopy volumes, with JAX and Flax.

Packages follow the data, and import only from those before them:
io -> data -> targets -> models / detection -> train -> inference -> postprocess
-> evaluation -> stages -> pipelines -> main. `errors`, `geometry`, `settings`,
`lazy`, `report` and `runtime` may be imported from anywhere; `configlib` only
by config files (tests/test_import_direction.py keeps this so).
"""

__version__ = "0.1.0"
