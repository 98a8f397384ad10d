"""Run Megatron-LM's `tools/preprocess_data.py`, unmodified, on Python 3.11 without triton.

    python3 benchmarks/megatron_preprocess_shim.py MEGATRON_LM_ROOT [preprocess_data.py args]

The tool itself needs only Megatron's tokenizer builder, its argument parser and
`indexed_dataset`, but importing them runs `megatron.core`'s and `megatron.training`'s package
imports, which pull in the whole training stack. Three things stand in the way here, and each
is bridged without touching Megatron's files:
- `megatron/training/models/hybrid.py` imports `typing.override` (Python 3.12; the reason
  Megatron-LM requires >= 3.12): an identity decorator is set on 3.11;
- kernel modules (mamba/ssm ops, MoE paged stash, mxfp8) `import triton`, a GPU-only package:
  a stub module answers every attribute (nothing calls a kernel while preprocessing); torch's
  inductor is imported first, so that torch itself still sees no triton;
- `megatron/__init__.py` (not in the core wheel) is entered as a bare namespace package.
"""

import importlib
import runpy
import sys
import types
import typing


class _Stub(types.ModuleType):
    """Any attribute is another stub; calling one with a function returns it (a decorator)."""

    def __getattr__(self, name: str) -> "_Stub":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return self


def main() -> None:
    if not hasattr(typing, "override"):
        typing.override = lambda f: f  # type: ignore[attr-defined]
    root = sys.argv.pop(1)
    megatron = types.ModuleType("megatron")
    megatron.__path__ = [f"{root}/megatron"]
    sys.modules["megatron"] = megatron
    for module in ("torch._inductor.compile_fx", "torch._inductor.cpu_vec_isa",
                   "torch.distributed.tensor"):  # torch first: it must see no triton
        importlib.import_module(module)
    for name in ("triton", "triton.language", "triton.language.core", "triton.runtime"):
        sys.modules[name] = _Stub(name)
    sys.modules["triton"].__version__ = "3.4.0"
    sys.argv[0] = f"{root}/tools/preprocess_data.py"
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
