"""Readers for the official dataset formats (DATA_FORMATS.md) and the embedded demo suite.

:data:`READERS` maps a dataset role to ``reader(root, split) -> Split``
(:class:`~.common.Split`); ``embedded.build_embedded`` writes the embedded real-image suite in
those same formats.
"""
from types import MappingProxyType

from .imagenet import imagenet_split
from .places205 import places205_split

READERS = MappingProxyType({"imagenet": imagenet_split, "places": places205_split})
