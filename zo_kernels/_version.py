"""The package version: the one place it is written.

``setup.py`` reads this line as text (so that building never imports the package, which needs
torch); ``zo_kernels.__version__`` imports it.
"""

__version__ = "0.1.0"
