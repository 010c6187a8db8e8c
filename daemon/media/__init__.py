"""Media helpers behind :mod:`daemon.imageio`: the format table, metadata, the PNG fast path.

:mod:`daemon.imageio` is the public entry point; these modules take and return plain values (arrays, bytes,
dataclasses) so that each can be tested alone.
"""
