"""The release number, in one place: the package, the CLI's --version and every bank's manifest read it."""
__version__ = "0.1.0"
