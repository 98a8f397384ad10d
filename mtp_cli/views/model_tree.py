"""A rich tree of a model's modules with parameter counts; identical siblings are grouped."""

from __future__ import annotations

from rich.tree import Tree
from torch import nn


def _own_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _signature(module: nn.Module) -> tuple:
    """Structure of a module: class names and parameter shapes, to group identical layers."""
    return tuple((name, type(m).__name__, tuple((n, tuple(p.shape)) for n, p in
                  m.named_parameters(recurse=False))) for name, m in module.named_modules())


def _label(name: str, module: nn.Module) -> str:
    count = _own_count(module)
    counted = f" [cyan]{count:,}[/]" if count else ""
    return f"[bold]{name}[/] [dim]{type(module).__name__}[/]{counted}"


def _add_children(tree: Tree, module: nn.Module, depth: int, max_depth: int) -> None:
    if depth >= max_depth:
        return
    children = list(module.named_children())
    index = 0
    while index < len(children):
        _name, child = children[index]
        run = [children[index]]
        signature = _signature(child)
        while (index + len(run) < len(children)
               and _signature(children[index + len(run)][1]) == signature):
            run.append(children[index + len(run)])
        if len(run) > 2:
            first, last = run[0][0], run[-1][0]
            count = _own_count(child)
            node = tree.add(f"[bold]{first}..{last}[/] [dim]{len(run)} x {type(child).__name__}"
                            f"[/] [cyan]{count:,} each[/]")
        else:
            for sub_name, sub in run:
                _add_children(tree.add(_label(sub_name, sub)), sub, depth + 1, max_depth)
            index += len(run)
            continue
        _add_children(node, child, depth + 1, max_depth)
        index += len(run)


def module_tree(model: nn.Module, title: str, max_depth: int = 4) -> Tree:
    """The module hierarchy to `max_depth`, with per-module parameter counts."""
    tree = Tree(f"[bold magenta]{title}[/] [cyan]{sum(p.numel() for p in model.parameters()):,}"
                f"[/] parameters")
    _add_children(tree, model, 0, max_depth)
    return tree
