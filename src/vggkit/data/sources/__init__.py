"""Readers for each on-disk dataset format; each returns a ``RawData`` of numpy arrays."""

from vggkit.data.sources.base import RawData

__all__ = ["RawData"]
