"""Upscaler backends: pixels in, pixels out.

This package knows devices, precision, tiling and weights, and nothing about inbox files, queues or databases.
The entry points are :func:`models.registry.load_upscaler` and the catalogue in :mod:`models.catalog`.
"""
