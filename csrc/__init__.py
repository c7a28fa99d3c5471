"""C++ CPU ops of the guidance hot path (`elucd_ops.cpp`), built on first use; see `ops`."""
