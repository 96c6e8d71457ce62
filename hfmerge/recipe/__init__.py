"""The YAML recipe: schema, cross-field checks, and the YAML locations that errors point at."""
