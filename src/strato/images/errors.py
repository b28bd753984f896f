"""The one error type of strato.images."""


class ImageError(Exception):
    """A guest image could not be fetched or built; the message says what to do."""
