"""`python -m elucd_fast.cli ...` (e.g. under torchrun) runs the `elucd-fast` command line."""
from . import main

main()
