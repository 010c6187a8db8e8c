"""The upscaled service: configuration, watcher, durable store, worker loop, image I/O, metrics and the CLI.

This package never imports torch, OpenCV's dnn module or diffusers: those live behind :mod:`models`.
"""

__version__ = "0.1.0"
