"""`python -m hfmerge` runs the command line."""

from hfmerge.cli.entry import console_main

console_main()
