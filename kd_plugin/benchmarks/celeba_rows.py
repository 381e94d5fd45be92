"""The rows of `kd-plugin bench celeba`: a row is a method of the registry ('ekd', 'proxyless+ekd', ...; 'student' =
none) with optional settings, each after an '@' ('proxyless+ekd@fit@memory'), read against the method's plan
(kd_plugin.methods.plan). Which rows run by default, which get every seed, and the folder of each run.

The settings: `fit` (centres="fit"), `memory` (EKD's cross-batch memory of 4096 rows and first-batch anchors), `utk`
(the unlabelled faces, half of each batch's random part), `views` (consistent views, kd_plugin.data.views: student and
teacher see the same flipped, cropped and mixed image, the teacher online; --views-* set them)."""

from __future__ import annotations

import os

from kd_plugin.errors import KDPluginError

# settings a row may add after '@': name -> (its config.kd overrides, what the row's method must have, a test of that
# on the method's plan, kd_plugin.methods.plan)
VARIANTS = {
    "fit": ({}, "centres", lambda plan: plan.centres),  # the head's centres: "fit" (kd_block's centres)
    "memory": ({"ekd": {"memory": 4096, "anchor_init": "first"}}, "ekd", lambda plan: "ekd" in plan.names),
    # kd.unlabeled: the unlabelled faces (set per run: the data path and the batch share)
    "utk": ({}, "label-free", lambda plan: bool(plan.label_free)),
    # kd.views: consistent views (--views-crop, --views-mixup), their teacher embeddings in a shared cache (set per run)
    "views": ({}, "", lambda plan: True),  # with mixed labels dropped, a label-free term is needed (checked in main)
}
FULL = ("student", "l2", "cosine", "cosine@views", "adadistill", "adadistill+ekd@memory", "proxyless", "proxyless@fit",
        "ekd", "ekd@memory", "proxyless+ekd", "proxyless+ekd@fit@memory", "proxyless_adaptive+ekd@fit@memory", "rkd@utk")
QUICK = ("student", "proxyless+ekd@fit@memory", "adadistill", "l2@utk")
# the headline: ProxylessKD+EKD, the methods this plugin is named for, its best head first; every seed trains the
# first of these families among the rows (its row with the most settings), beside the student and the best other row
HEADLINE = ("proxyless_adaptive+ekd", "proxyless+ekd")


def registry_rows() -> tuple[str, ...]:
    """Every row the registry offers on its own: the student alone, each method that runs from a teacher and the
    training data alone, and the combination of the methods this plugin is about."""
    from kd_plugin.methods import methods, this_plugins_methods

    runnable = {name: m for name, m in methods().items() if m.runs_from_a_teacher}
    ours = this_plugins_methods(runnable)
    variants = [n for n, m in runnable.items() if not m.baseline and n not in ours]
    return ("student", *(n for n, m in runnable.items() if m.baseline), *ours, *variants, "+".join(ours))


def method_plan(method: str):
    """The plan (kd_plugin.methods.plan) of a row's method; the student's is method 'none'."""
    from kd_plugin.methods import plan_of

    return plan_of("none" if method == "student" else method)


def parse_row(row: str) -> tuple[str, tuple[str, ...]]:
    """'proxyless+ekd@fit@memory' -> ('proxyless+ekd', ('fit', 'memory')), checked against the registry."""
    method, *variants = row.split("@")
    variants = tuple(v for v in variants if v)
    plan = method_plan(method)  # unknown methods stop here, with the registry's list
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise KDPluginError(f"--methods: row {row!r}: unknown settings {unknown}; allowed after '@': "
                            f"{', '.join(VARIANTS)}")
    for v in variants:
        _, wanted, present = VARIANTS[v]
        if not present(plan):
            raise KDPluginError(f"--methods: row {row!r}: '@{v}' needs a method with {wanted} in it")
    return method, variants


def seeded_rows(rows: list[str]) -> list[str]:
    """The rows every seed trains besides the best other row (chosen by the runner at seed 0): the student and the
    headline, the first HEADLINE family among the rows, its row with the most settings (the first such)."""
    out = [r for r in rows if r == "student"][:1]
    for family in HEADLINE:
        members = [r for r in rows if parse_row(r)[0] == family]
        if members:
            return out + [max(members, key=lambda r: len(parse_row(r)[1]))]
    return out


def run_folder(root: str, row: str, seed: int) -> str:
    """The folder of one run of `row` under `root`: '<row with @ as _at_>/seed<k>'."""
    return os.path.join(root, row.replace("@", "_at_"), f"seed{seed}")
