"""One plan per run: what a resolved `config.kd` runs and what the run needs, read from the method registry once.

`config.resolve` makes it (`cfg.kd.plan`) from the chosen methods; the config checks, the builders
(kd_plugin.run.build), the objective and the train_v2 hook read the plan and never ask the registry what a method needs
again. A plan holds names and flags only (no modules, no functions), so it travels with the config wherever the config
goes: a copy, a pickle, another process.

    config -> resolve (defaults, checks; the plan) -> build (teacher, head, terms from the plan) -> KDObjective
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_plugin.methods.registry import Method


@dataclass(frozen=True)
class Plan:
    """What one run does. `head`: the head method's name, or "trainable" (no head method: PartialFC_V2's
    classifier); `terms`: (name, weight) of each distillation term, in the configured order."""

    method: str  # as configured ("proxyless+ekd")
    head: str
    terms: tuple[tuple[str, float], ...]
    titles: tuple[tuple[str, str], ...]  # (name, title) of every chosen method, for messages
    teacher: bool  # some method reads the teacher's embeddings of each batch
    centres: bool  # the head inherits the teacher's class centres (kd.<head>.centres)
    logits: tuple[str, ...]  # terms over the logits of the inherited centres (they need a head that inherits them)
    balanced: bool  # some method wants identity-balanced batches (kd.sampler.balanced's default)
    equal_dims: tuple[str, ...]  # methods that compare student and teacher embeddings directly
    label_free: tuple[str, ...]  # terms that read no labels: they also see rows without identity
    own_teacher: tuple[str, ...]  # methods that bring their own teacher and change it during the run (multi-step)

    @property
    def names(self) -> tuple[str, ...]:
        """Every chosen method: the head method (if any), then the terms."""
        return ((self.head,) if self.head != "trainable" else ()) + tuple(name for name, _ in self.terms)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.terms)

    def title(self, name: str) -> str:
        return dict(self.titles)[name]


def make_plan(method: str, chosen: dict[str, Method], weights: dict[str, float]) -> Plan:
    """The plan of `method` from its registered methods (`chosen`: {name: Method}, configured order) and each term's
    resolved weight."""
    head = next((name for name, m in chosen.items() if m.kind == "head"), "trainable")
    return Plan(
        method=str(method), head=head,
        terms=tuple((name, float(weights[name])) for name, m in chosen.items() if m.kind == "term"),
        titles=tuple((name, m.title) for name, m in chosen.items()),
        teacher=any("teacher" in m.needs for m in chosen.values()),
        centres=head != "trainable" and "centres" in chosen[head].needs,
        logits=tuple(name for name, m in chosen.items() if "logits" in m.needs),
        balanced=any("balanced" in m.needs for m in chosen.values()),
        equal_dims=tuple(name for name, m in chosen.items() if "equal_dims" in m.needs),
        label_free=tuple(name for name, m in chosen.items() if m.label_free),
        own_teacher=tuple(name for name, m in chosen.items() if m.teacher is not None))
