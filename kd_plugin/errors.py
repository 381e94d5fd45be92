"""Exceptions the plugin raises for bad input, so callers can catch them apart from bugs."""


class KDPluginError(Exception):
    """Base class of every error kd_plugin raises on purpose."""


class DataFormatError(KDPluginError, ValueError):
    """A data file is malformed: the message names the file, the place in it and what to do."""


class UnsafePickleError(KDPluginError, ValueError):
    """A pickle asked for something outside the allowed types and was refused without running it."""


class DimensionMismatch(KDPluginError, ValueError):
    """Student and teacher embeddings of different sizes, where a method compares them directly."""


class SettingError(KDPluginError, ValueError):
    """A setting outside what the code honours (the message names the key, the value and what is allowed)."""

