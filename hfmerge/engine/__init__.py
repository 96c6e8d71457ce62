"""The streaming merge engine: a plan of tensor jobs, run chunk by chunk under a memory budget."""
