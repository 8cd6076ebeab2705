"""Readers for the official dataset formats (DATA_FORMATS.md) and the embedded demo suite.

``imagenet.imagenet_split`` and ``places205.places205_split`` return a
:class:`~.common.Split`; ``embedded.build_embedded`` / ``embedded.embedded_datasets`` write the
embedded real-image suite in those same formats.
"""
