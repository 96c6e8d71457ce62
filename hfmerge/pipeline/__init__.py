"""The pipeline: `run_recipe` and its steps in run order.

Steps: gate, align, repair, route, card, publish.

The only orchestrator: every other package does one stage and knows nothing of the others above it.
"""
