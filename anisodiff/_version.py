"""The installed version of anisodiff (one place, so that no module imports the package itself)."""
try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("anisodiff")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0+unknown"
