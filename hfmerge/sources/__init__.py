"""Model references -> pinned sources -> inspected models (config and safetensors headers).

The words for a model, used across the package:

- reference (`ref: str`): the model as the user wrote it, in a recipe or on the command line: a
  directory, `zoo:NAME` or a Hub id `org/name[@revision]`.
- source (`ModelSource`, refs.py): the reference pinned: a local `path`, and for a Hub model its
  `hub_id` and the commit sha it resolved to (`revision`).
- inspected model (`InspectedModel`, inspection.py): a source with its parsed config.json, its
  checkpoint's header index and its architecture spec.
- label (`label: str`): the model's name in messages and tables (`ModelSource.label`, which is the
  reference). A function that takes a string only to name a model in messages calls it `label`
  (`label_a`/`label_b` for a pair).

Nothing here downloads weights: Hub ids are pinned to a commit sha and read through range requests.
"""
