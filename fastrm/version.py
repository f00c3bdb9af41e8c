"""fastrm's version, in a module of its own so that modules the package imports can read it without importing
the package (``from fastrm import __version__`` inside fastrm would import fastrm from itself)."""

__version__ = "0.1.0"
