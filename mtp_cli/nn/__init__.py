"""The foundation the models stand on: ModuleSpecs, the module registry, packed-sequence params."""
