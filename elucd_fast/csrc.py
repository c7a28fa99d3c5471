"""C++ CPU ops of the guidance hot path (`elucd_ops.cpp`), built on first use; see `ops`.

The sources sit in the repository's top-level csrc/ (see `source_folders` for why that folder is
not itself a package): this module is the package's face."""
from elucd_fast.source_folders import source_folder

__path__ = [str(source_folder("csrc", "elucd_ops.cpp"))]
if __spec__ is not None:
    __spec__.submodule_search_locations = __path__
