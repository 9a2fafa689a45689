"""Errors of the datasets: a data folder in the wrong layout, a file that cannot be read."""

__all__ = ["DatasetLayoutError", "UnreadableImageError"]


class DatasetLayoutError(ValueError):
    """The data root does not have the layout the loader expects (the message shows that layout)."""


class UnreadableImageError(RuntimeError):
    """An image file could not be opened or decoded (the message names the file)."""
