"""Facts about a spec's model, read from a build on the meta device: what `mtp build` shows
(`describe`: stages, modules, parameter counts, the materialise check), the parameter counts
themselves (`counts`), and each stage's tensors for the memory plan (`stage_tensors`, which
hands them to the torch-free arithmetic of `mtp_cli.plan.memory`).

They stand on `mtp_cli.builders` (assembly) and are read by the CLI, the launcher's dry run and
the views; nothing below them imports them.
"""
