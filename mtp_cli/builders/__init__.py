"""From spec to modules: ModuleSpecs, backends, default trees, initialisation, the builder.

`build_model` lives in `mtp_cli.builders.model_builder` (also exported as `mtp_cli.build_model`);
this package's namespace stays import-light so that model modules can register themselves.
"""

from mtp_cli.nn.module_spec import ModuleSpec, build_module, register_module

__all__ = ["ModuleSpec", "build_module", "register_module"]
