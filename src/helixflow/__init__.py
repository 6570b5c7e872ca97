"""helixflow: run Helical single-cell foundation models over .h5ad datasets of any size."""

from importlib.metadata import version

__version__ = version("helixflow")
