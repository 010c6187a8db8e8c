"""Upscaler backends: pixels in, pixels out.

This package knows devices, precision, tiling and weights, and nothing about inbox files, queues or databases.
Entry points:

- :data:`models.backends.BACKENDS`, :func:`models.backends.get_backend`, :func:`models.backends.backend_of`: the
  model families, what they need installed, their rule parameters and start-up warnings;
- :class:`models.registry.ModelCache` ``.get(model_id, scale, LoadContext(...))``: a loaded
  :class:`models.base.Upscaler`, called the same way for every backend: ``up(pixels, params=None)``;
- :mod:`models.catalog` (every model id and its weights) and :mod:`models.weights` (fetching and verifying them);
- :mod:`models.devices`: device resolution and checks, build info and GPU memory for the gauges, without importing
  torch where it is not needed;
- :mod:`models.runtime` (the torch runtime) and :mod:`models.tiling` (the one tiler), which the backends share;
- :mod:`models.testing`: small real models built on the spot, for tests and benchmarks.

See docs/models.md.
"""
