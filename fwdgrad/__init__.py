"""fwdgrad: fixed-point forward-gradient training for integer edge accelerators."""

__version__ = "0.1.0"
