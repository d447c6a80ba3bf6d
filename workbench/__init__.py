"""Medical imaging classification workbench."""

__version__ = "0.1.0"
