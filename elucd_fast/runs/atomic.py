"""The run's atomic files: `elucd_fast.atomic` (kept importable from here, where the run
writers and the commands have always found it)."""
from ..atomic import TEMP_SUFFIX, atomic_write, check_free_space, check_writable, fsync_directory, remove_quietly

__all__ = ["TEMP_SUFFIX", "atomic_write", "check_free_space", "check_writable", "fsync_directory", "remove_quietly"]
