"""rafsfs: a lazy-loading container-image filesystem (Nydus RAFS v6) in Python.

The core package knows nothing of FUSE or fscache: it reads and builds RAFS v6 / EROFS images and
moves blob data (backend -> cache -> reader).  Mount backends live in ``fuse_backend`` and
``fscache_backend`` and depend on this package, never the other way round.
"""

__version__ = "0.1.0"
