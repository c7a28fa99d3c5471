"""`python -m elucd_fast ...` (e.g. under torchrun) runs the `elucd-fast` command line."""
from .cli import main

main()
