"""`python -m hfmerge` runs the command line."""

from hfmerge.entry import console_main

console_main()
