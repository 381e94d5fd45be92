"""The distillation methods and their catalogue. Importing it registers the built-in ones, each declared next to its
code: ProxylessKD and AdaDistill in kd_plugin.methods.heads; EKD, the baseline terms and PocketNet's multi-step KD in
the modules of kd_plugin.methods.losses (every module there is imported, so a new term is one new file). Beside them:
the registry (registry.py), the plan of a run (plan.py) and the KD objective (objective.py).
A user's own term joins with `kd_plugin.register_term` (see kd_plugin.methods.registry)."""

from __future__ import annotations

import importlib
import pkgutil

import kd_plugin.methods.heads  # noqa: F401  (registers proxyless, adadistill)
from kd_plugin.errors import KDPluginError
from kd_plugin.methods.plan import Plan, make_plan
from kd_plugin.methods.registry import NEEDS, Method, registered

_losses = importlib.import_module("kd_plugin.methods.losses")
for _module in pkgutil.iter_modules(_losses.__path__):  # the terms declared in kd_plugin/methods/losses/*.py
    importlib.import_module(f"kd_plugin.methods.losses.{_module.name}")


def methods() -> dict[str, Method]:
    """Every registered method by name: the built-ins first — heads, then terms by module name, each module's in
    declaration order: the same order whichever module was imported first —, then the user's in registration order."""
    everything = list(registered().values())
    builtins = sorted((m for m in everything if m.builtin),
                      key=lambda m: (m.kind != "head", m.origin.rsplit(".", 1)[0]))  # stable: declaration order kept
    return {m.name: m for m in builtins + [m for m in everything if not m.builtin]}


def names(method: str) -> list[str]:
    """The method names of a combination such as 'proxyless+ekd' ('none' and '' have none)."""
    return [] if method in ("none", "") else [m.strip() for m in method.split("+") if m.strip()]


def chosen(method: str) -> dict[str, Method]:
    """The registered methods of a combination such as 'proxyless+ekd' ({name: Method}, in its order); unknown names
    stop with the registry's list."""
    catalogue = methods()
    unknown = [n for n in names(method) if n not in catalogue]
    if unknown:
        raise KDPluginError(f"method {method!r}: unknown {unknown}; allowed: {', '.join(catalogue)}, or 'none'")
    return {n: catalogue[n] for n in names(method)}


def this_plugins_methods(among: dict[str, Method] | None = None) -> list[str]:
    """The methods this plugin is named for, in registry order: the non-baselines, with one head (the first one,
    ProxylessKD; its variants, such as its adaptive centres, are left out) so that they combine into one method."""
    among = methods() if among is None else among
    ours = [name for name, m in among.items() if not m.baseline]
    heads = [name for name in ours if among[name].kind == "head"]
    return [name for name in ours if name not in heads[1:]]


def plan_of(method: str) -> Plan:
    """The plan of a method string ('proxyless+ekd'; 'none' or '' for none) at its published weights: what it runs and
    needs, without a config (the benchmark's rows, the demo). Unknown names stop with the registry's list."""
    picked = chosen(method)
    return make_plan(method, picked, {name: m.weight for name, m in picked.items() if m.kind == "term"})


def with_centres(block: dict, method: str, centres) -> dict:
    """config.kd `block` with `centres` (shards, a file, 'estimate' or 'fit') in the block of `method`'s head that
    inherits the teacher's centres (config.kd.<head>.centres); refused when the method has no such head."""
    plan = plan_of(method)
    if not plan.centres:
        raise KDPluginError(f"centres = {centres!r}: method {method!r} has no head that inherits the teacher's class "
                            f"centres ({', '.join(n for n, m in methods().items() if m.inherits_centres)}): "
                            f"remove centres or add such a head")
    return dict(block, **{plan.head: dict(block.get(plan.head) or {}, centres=centres)})


def kd_block(method: str, centres=None, **settings) -> dict:
    """A config.kd block running `method` ('none', 'ekd', 'proxyless+ekd', ...) with `settings` (teacher, cache,
    sampler, ...): when the method's head inherits the teacher's centres, `centres` (default 'estimate': from the
    teacher) goes into that head's block."""
    block = dict(settings, method=method)
    if plan_of(method).centres:
        block = with_centres(block, method, centres or "estimate")
    elif centres is not None:
        block = with_centres(block, method, centres)  # refused, with the reason
    return block


def describe() -> str:
    """The catalogue as text: `kd-plugin methods`."""
    lines, width = [], max(11, *(len(name) for name in methods()))
    for name, m in methods().items():
        weight = f", weight {m.weight:g}" if m.kind == "term" else ""
        lines.append(f"{name:<{width}} {m.title} ({m.kind}{weight}): {m.summary}")
        lines.append(f"{'':<{width}} needs: {m.needs_text()}")
        if m.defaults:
            lines.append(f"{'':<{width}} config.kd.{name} = {dict(m.defaults)}")
        if not m.builtin:
            lines.append(f"{'':<{width}} registered by {m.origin}")
    lines.append("")
    lines.append("what the needs mean:")
    lines += [f"  {need}: {meaning}" for need, meaning in NEEDS.items()]
    lines.append("combine with '+', e.g. kd.method = 'proxyless+ekd'; kd.weights = {term: weight} overrides weights")
    return "\n".join(lines)
