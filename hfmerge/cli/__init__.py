"""The command line: thin wrappers that parse options, call the public API and print results."""
