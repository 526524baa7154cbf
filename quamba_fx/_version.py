"""The library's version, in a module of its own so that any module can read it without importing
the lazy package root (which imports every module on first use)."""

__version__ = "0.1.0"
