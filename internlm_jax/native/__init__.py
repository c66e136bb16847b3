"""Native (C++) CPU kernels registered with XLA's FFI, built on first use (see build.py)."""
