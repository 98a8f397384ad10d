"""Parallel layouts, applied to a plain model from outside (torchtitan style).

`dims.ParallelDims` checks the sizes, `mesh.build_mesh` makes the named process groups
(pp, dp, cp, tp; the expert and embedding groups on request: no other module makes one),
`data_parallel.apply_data_parallel` wraps the model with DDP or shards it with
FSDP2 over the data(-x-context)-parallel mesh; the tensor, pipeline and context parallel
transforms live beside them. Import the submodules directly (nothing is imported here, so that
importing one transform never pulls in the others).
"""
