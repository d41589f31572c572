"""On-disk structures of RAFS v6 / EROFS, one module each.

Every structure is declared once (see :mod:`rafsfs.format.record`) and used by both the reader and the builder,
so a field's offset lives in exactly one place.  All integers are little-endian.
"""
