"""`python -m hfmerge` runs the command line."""

from hfmerge.cli import console_main

console_main()
