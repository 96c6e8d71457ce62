"""Model references -> pinned sources -> inspected models (config and safetensors headers).

Nothing here downloads weights: Hub ids are pinned to a commit sha and read through range requests.
"""
