"""Training configs: arcface_torch's keys with its defaults, plus the `config.kd` block — the one place that reads raw
config. Validation names the key, the value and what is allowed."""

from __future__ import annotations

import contextvars
import copy
import importlib.util
import os
import warnings
from typing import Any

from easydict import EasyDict

from kd_plugin.errors import KDPluginError
from kd_plugin.methods.plan import Plan, make_plan
from kd_plugin.methods.heads import CENTRE_FIT, DERIVED_CENTRES

# arcface_torch's configs/base.py defaults (the keys this trainer reads), plus the job keys its configs always set
BASE = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": True,
    "output": None, "embedding_size": 512, "sample_rate": 1.0, "interclass_filtering_threshold": 0.0,
    "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "verbose": 2000, "frequent": 10, "gradient_acc": 1, "seed": 2048, "num_workers": 2, "dali": False,
    "rec": None, "num_classes": None, "num_image": None, "num_epoch": 20, "warmup_epoch": 0, "val_targets": [],
    "max_steps": None,  # kd_plugin: stop after this many steps (short runs, tests)
    "checkpoint_every": 1000,  # kd_plugin: also write checkpoint_gpu_{rank}.pt every this many steps
    "amp_dtype": "float16",  # kd_plugin: the autocast dtype when fp16=True ("bfloat16": no GradScaler needed)
    "dali_aug": False,
}
AMP_DTYPES = ("float16", "bfloat16")
# arcface_torch's base.py keys that only its wandb logger reads: kd-plugin train accepts them while using_wandb is off
WANDB_KEYS = ("using_wandb", "wandb_key", "suffix_run_name", "wandb_entity", "wandb_project", "wandb_log_all",
              "save_artifacts", "wandb_resume", "notes")

# config.kd's own settings; each registered method adds its block `config.kd.<name>` (kd_plugin.methods)
KD_SETTINGS = {
    "method": "none",  # "proxyless+ekd", a list, or {term: weight}
    "weights": {},  # per-term weight overrides; otherwise each term's published default
    "teacher": None, "teacher_mean": None, "teacher_std": None, "teacher_bgr": False,
    "student_mean": 127.5, "student_std": 127.5,
    "cache": None,  # folder written by `kd-plugin cache`
    # images without identity labels (a folder of images, any dataset layout, or a list): `per_batch` of each rank's
    # batch_size are drawn from them, and only the label-free terms see them
    "unlabeled": {"data": None, "per_batch": 0},
    # consistent augmented views (kd_plugin.data.views): student and teacher see the same view of each sample
    "views": {
        "enabled": False,  # flip, crop and mixup drawn per (seed, epoch, sample); the teacher runs on that view
        "crop": 0.8,  # random-resized crop: the kept area is a uniform share of the image in [crop, 1] (1: no crop)
        "mixup": 0.5,  # share of samples mixed with another training image (lambda ~ U(0, 1))
        # a mixed image: "mix" (the head: lam x own + (1 - lam) x partner) or "drop" its label (label-free terms only;
        # the default before 0.5.0: measured worse, docs/benchmarks.md)
        "mixed_labels": "mix",
        "shift": 0,  # a translation of up to this many pixels each way after the crop (0: none; with crop 1: aligned)
        "seed": 0,  # the views' own seed, not config.seed: every run and training seed sees the same views
        "cache": None,  # teacher-view cache folder: the teacher's embedding of each (sample, epoch) view, made once
    },
    "sampler": {"identities_per_batch": 8, "images_per_identity": 4, "balanced": None},  # None: on when a term needs it
    "margin_on_random_part": False,  # the reference EKD recipe: margin loss on the random part only
    "reference_gradient_scaling": False,
    "teacher_batch_size": 256,
    "teacher_amp": None,  # None (fp32), "float16" or "bfloat16": autocast for a torch teacher's forward
    # under train_v2: None keeps upstream's CallBackVerification; "kd_plugin" puts kd_plugin's .bin verification in its
    # place (upstream's calls scipy's interp1d on FARs with repeats, which current scipy refuses). kd-plugin train
    # always verifies with kd_plugin's.
    "verifier": None,
}
# what resolve() adds to config.kd: {term: weight}, the head method and the plan
RESOLVED_KEYS = ("terms", "head", "plan")
# config.kd keys of kd_plugin <= 0.5 that moved into the block of the head that inherits the teacher's centres
# (config.kd.proxyless, config.kd.proxyless_adaptive): old key -> its key there, and its old default
MOVED_TO_HEAD = {"centres": ("centres", None), "centre_dtype": ("dtype", "float32"), "centre_fit": ("fit", CENTRE_FIT)}


def _fail(key: str, value: Any, allowed: str) -> KDPluginError:
    return KDPluginError(f"config.{key} = {value!r}: {allowed}")


def kd_defaults() -> dict:
    """config.kd's settings plus the block of every registered method that has one, with their defaults."""
    from kd_plugin.methods import methods

    out = copy.deepcopy(KD_SETTINGS)
    for name, method in methods().items():
        if name in KD_SETTINGS or name in RESOLVED_KEYS:
            raise KDPluginError(f"method {name!r} ({method.origin}) has the name of the config.kd setting {name!r}; "
                                f"register it under another name")
        if method.defaults:
            out[name] = method.block()
    return out


def _moved_keys(given: dict) -> dict:
    """config.kd with the keys that moved into the inheriting head's block (MOVED_TO_HEAD) put there, each with a
    FutureWarning that names its new key; refused where the method has no such head (unless left at its old
    default), where the head has no such setting, or where the old and the new key are both set."""
    old = [key for key in MOVED_TO_HEAD if key in given]
    if not old:
        return given
    from kd_plugin.methods import methods

    catalogue, out = methods(), dict(given)
    head = next((n for n in parse_method(given.get("method", "none"))
                 if catalogue[n].inherits_centres), None)
    inheriting = ", ".join(n for n, m in catalogue.items() if m.inherits_centres)
    for key in old:
        new, default = MOVED_TO_HEAD[key]
        value = out.pop(key)
        if head is None:
            if value != default:
                raise _fail(f"kd.{key}", value, f"a setting of the head that inherits the teacher's class centres "
                                                f"({inheriting}), and method {given.get('method')!r} has none: remove "
                                                f"it")
            warnings.warn(f"config.kd.{key} = {value!r} is kd_plugin 0.5's default and no longer a config.kd setting "
                          f"(it moved into the block of the head that inherits the teacher's centres, "
                          f"config.kd.<head>.{new}): remove it", FutureWarning, stacklevel=4)
            continue
        block = dict(out.get(head) or {})
        if new not in catalogue[head].defaults:
            raise _fail(f"kd.{key}", value, f"{catalogue[head].title} (config.kd.{head}) has no {new!r} setting (its "
                                            f"settings: {', '.join(catalogue[head].defaults)}): remove it")
        if new in block:
            raise _fail(f"kd.{key}", value, f"config.kd.{head}.{new} = {block[new]!r} is set too: config.kd.{key} is "
                                            f"its old name; keep config.kd.{head}.{new} only")
        block[new] = value
        out[head] = block
        warnings.warn(f"config.kd.{key} is now config.kd.{head}.{new} (the settings of the head that inherits the "
                      f"teacher's centres moved into its block): write {head}={{{new!r}: {value!r}}} in config.kd; "
                      f"the old key will stop working in a later release", FutureWarning, stacklevel=4)
    return out


def parse_method(method: Any) -> dict[str, float | None]:
    """`"proxyless+ekd"`, `["proxyless", "ekd"]` or `{"ekd": 1.0, "l2": 50}` -> {name: weight or None (default)}."""
    from kd_plugin.methods import methods, names as split

    if method in (None, "none", ""):
        return {}
    if isinstance(method, str):
        names = {m: None for m in split(method)}
    elif isinstance(method, (list, tuple)):
        names = {str(m): None for m in method}
    elif isinstance(method, dict):
        names = {str(k): float(v) for k, v in method.items()}
    else:
        raise _fail("kd.method", method, "expected a string like 'proxyless+ekd', a list of names, or {name: weight}")
    catalogue = methods()
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        raise _fail("kd.method", method, f"unknown {unknown}; allowed: {', '.join(catalogue)}, or 'none' (a term of "
                                         f"your own: kd_plugin.register_term in the config file; list: kd-plugin "
                                         f"methods)")
    heads = [n for n in names if catalogue[n].kind == "head"]
    if len(heads) > 1:
        raise _fail("kd.method", method, f"{' and '.join(heads)} each replace the classifier "
                                         f"({', '.join(catalogue[h].title for h in heads)}): choose one")
    return names


def _merge(defaults: dict, given: dict, prefix: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise _fail(f"{prefix}.{key}", value, f"unknown key; allowed: {', '.join(sorted(defaults))}")
        if isinstance(defaults[key], dict) and defaults[key]:
            if not isinstance(value, dict):
                raise _fail(f"{prefix}.{key}", value, "expected a dict")
            out[key] = _merge(defaults[key], value, f"{prefix}.{key}")
        else:
            out[key] = value
    return out


def _check_unlabeled(kd: dict, plan: Plan) -> None:
    """Unlabelled images feed only the terms that do not need labels: refused where they would feed nothing."""
    block = kd["unlabeled"]
    if not isinstance(block["per_batch"], int) or block["per_batch"] < 0:
        raise _fail("kd.unlabeled.per_batch", block["per_batch"], "expected the number of unlabelled images in each "
                                                                  "rank's batch, an integer >= 0")
    if bool(block["data"]) != bool(block["per_batch"]):
        raise _fail("kd.unlabeled", dict(block), "give both data (the image sets) and per_batch (how many of each "
                                                 "rank's batch_size), or neither")
    if block["data"]:
        _need_label_free(kd, plan, "kd.unlabeled", dict(block), "unlabelled images feed", "remove kd.unlabeled")


def _need_label_free(kd: dict, plan: Plan, key: str, value: Any, what: str, remedy: str) -> None:
    """Rows without identity (`what` makes them) are refused when no chosen term reads them."""
    if not plan.label_free:
        from kd_plugin.methods import methods

        offered = ", ".join(n for n, m in methods().items() if m.label_free)
        raise _fail(key, value, f"{what} only the terms that need no labels, and method {kd['method']!r} has none: "
                                f"add one ({offered}) or {remedy}")


def _check_views(kd: dict, plan: Plan) -> None:
    """Consistent views: settings in range, and refused where a part of them would not be honoured."""
    views, defaults = kd["views"], KD_SETTINGS["views"]
    if not isinstance(views["enabled"], bool):
        raise _fail("kd.views.enabled", views["enabled"], "expected True or False")
    if not views["enabled"]:
        changed = [k for k in defaults if k != "enabled" and views[k] != defaults[k]]
        if changed:
            raise _fail(f"kd.views.{changed[0]}", views[changed[0]], "applies only with kd.views.enabled = True: "
                                                                     "enable the views or remove it")
        return
    if not isinstance(views["crop"], (int, float)) or not 0 < views["crop"] <= 1:
        raise _fail("kd.views.crop", views["crop"], "expected the smallest share of the image area a crop keeps, in "
                                                    "(0, 1] (1: no crop; 0.8: a mild crop)")
    if not isinstance(views["mixup"], (int, float)) or not 0 <= views["mixup"] <= 1:
        raise _fail("kd.views.mixup", views["mixup"], "expected the share of samples mixed with another image, in "
                                                      "[0, 1] (0: no mixup)")
    if not isinstance(views["seed"], int):
        raise _fail("kd.views.seed", views["seed"], "expected an integer")
    if isinstance(views["shift"], bool) or not isinstance(views["shift"], int) or not 0 <= views["shift"] <= 16:
        raise _fail("kd.views.shift", views["shift"], "expected the largest translation in pixels, an integer in "
                                                      "[0, 16] (0: none)")
    if views["mixed_labels"] not in ("drop", "mix"):
        raise _fail("kd.views.mixed_labels", views["mixed_labels"], "expected 'drop' (a mixed image trains the "
                                                                    "label-free terms only) or 'mix' (and the head, "
                                                                    "lam-weighted over both identities)")
    if views["mixup"] > 0 and views["mixed_labels"] == "drop":
        _need_label_free(kd, plan, "kd.views.mixup", views["mixup"], "a mixed image has no single identity and feeds",
                         "set kd.views.mixup = 0")
    if views["mixup"] > 0 and kd["margin_on_random_part"]:
        raise _fail("kd.views.mixup", views["mixup"], "kd.margin_on_random_part gives the head the random part of "
                                                      "each batch, and mixed images there have no label: set one of "
                                                      "them off")
    if kd["cache"]:
        raise _fail("kd.cache", kd["cache"], "the cache holds the teacher's embeddings of each image and its flip, but "
                                             "with kd.views the student sees other views and the teacher must see "
                                             "them too: remove kd.cache (kd.views.cache keeps the teacher's "
                                             "embeddings of the views)")
    if views["cache"]:
        if not plan.teacher:
            raise _fail("kd.views.cache", views["cache"], f"method {kd['method']!r} does not use the teacher: there "
                                                          f"is nothing to cache; remove kd.views.cache")
        own = [plan.title(name) for name in plan.own_teacher]
        if own:
            raise _fail("kd.views.cache", views["cache"], f"{own[0]} changes its teacher during the run, and the "
                                                          f"cache keeps one teacher's views: remove kd.views.cache")


def _check_plan(kd: dict, plan: Plan) -> None:
    """What the plan's methods need from the config, checked once for all of them (each method's own check of its
    block included)."""
    from kd_plugin.methods import methods

    catalogue = methods()
    for name in plan.names:
        if catalogue[name].check is not None:
            catalogue[name].check(kd)
    for name in plan.logits:
        if not plan.centres:
            raise _fail("kd.method", kd["method"], f"{plan.title(name)} compares teacher and student logits over the "
                                                   f"inherited class centres: add proxyless (e.g. 'proxyless+{name}') "
                                                   f"and set kd.proxyless.centres")
    if plan.teacher and not kd["teacher"] and not kd["cache"]:
        raise _fail("kd.teacher", kd["teacher"], f"method {kd['method']!r} needs the teacher's embeddings: set "
                                                 f"kd.teacher (a model spec) or kd.cache")
    if plan.centres:
        _check_centres(kd, plan)


def _check_unused_blocks(kd: dict, plan: Plan) -> None:
    """A method's block (config.kd.<name>) changed from its defaults is refused when the method does not run."""
    from kd_plugin.methods import methods

    catalogue = methods()
    unused = [name for name, m in catalogue.items()
              if m.defaults and name not in plan.names and kd[name] != m.block()]
    if unused:
        raise _fail(f"kd.{unused[0]}", kd[unused[0]], f"the settings of {catalogue[unused[0]].title}, and method "
                                                      f"{kd['method']!r} does not run it: remove them or add "
                                                      f"{unused[0]} to kd.method")


def _check_centres(kd: dict, plan: Plan) -> None:
    """The inheriting head's `centres` and `fit` (every head that needs centres has them, kd_plugin.methods.heads)."""
    head, title = plan.head, plan.title(plan.head)
    centres, fit = kd[head]["centres"], kd[head]["fit"]
    if not centres:
        raise _fail(f"kd.{head}.centres", centres, f"{title} needs the teacher's class centres: the folder of its "
                                                   f"checkpoint_gpu_*.pt / rank_*_softmax_weight.pt shards, one "
                                                   f"classifier file, 'estimate' (class means of the teacher's "
                                                   f"embeddings) or 'fit' (a margin classifier fitted to them)")
    if centres in DERIVED_CENTRES and not kd["teacher"] and not kd["cache"]:
        raise _fail("kd.teacher", kd["teacher"], f"kd.{head}.centres = {centres!r} derives {title}'s centres from the "
                                                 f"teacher's embeddings: set kd.teacher (a model spec) or kd.cache")
    if centres == "fit" and not (isinstance(fit, dict) and set(fit) == set(CENTRE_FIT) and
                                 isinstance(fit["epochs"], int) and fit["epochs"] >= 1 and
                                 isinstance(fit["batch_size"], int) and fit["batch_size"] >= 1 and
                                 float(fit["lr"]) > 0):
        raise _fail(f"kd.{head}.fit", fit, f"expected {{'epochs', 'batch_size', 'lr'}} with epochs >= 1 and "
                                           f"batch_size >= 1 (integers) and lr > 0")


def resolve(config: dict) -> EasyDict:
    """Defaults filled in and everything checked; `cfg.kd.plan` (kd_plugin.methods.plan): what the run does and needs, with
    `cfg.kd.terms` = {term: weight} and `cfg.kd.head` (the head method or "trainable") spelled out from it."""
    cfg = EasyDict(copy.deepcopy(BASE))
    cfg.update({k: v for k, v in dict(config).items() if k != "kd"})
    kd = _merge(kd_defaults(), _moved_keys(dict(config.get("kd") or {})), "kd")
    from kd_plugin.methods import methods as catalogue

    weights = parse_method(kd["method"])
    chosen = {name: catalogue()[name] for name in weights}
    plan = make_plan(kd["method"], chosen, {name: kd["weights"].get(name, weights[name] if weights[name] is not None
                                                                    else m.weight)
                                            for name, m in chosen.items() if m.kind == "term"})
    kd["plan"], kd["terms"], kd["head"] = plan, plan.weights, plan.head
    unused = [name for name in kd["weights"] if name not in kd["terms"]]
    if unused:
        raise _fail(f"kd.weights.{unused[0]}", kd["weights"][unused[0]],
                    f"no term {unused[0]!r} in method {kd['method']!r} (its terms: {', '.join(kd['terms']) or 'none'}; "
                    f"weights exist for {', '.join(n for n, m in catalogue().items() if m.kind == 'term')}): fix the "
                    f"name or add the term to kd.method")
    _check_plan(kd, plan)
    if kd["verifier"] not in (None, "kd_plugin"):
        raise _fail("kd.verifier", kd["verifier"], "allowed: None (under train_v2: upstream's verification) or "
                                                   "'kd_plugin' (kd_plugin's in its place)")
    if kd["teacher_amp"] not in (None,) + AMP_DTYPES:
        raise _fail("kd.teacher_amp", kd["teacher_amp"], f"allowed: None (float32), {', '.join(AMP_DTYPES)}")
    _check_unlabeled(kd, plan)
    _check_views(kd, plan)
    _check_unused_blocks(kd, plan)
    sampler = kd["sampler"]
    balanced = sampler["balanced"] if sampler["balanced"] is not None else plan.balanced
    sampler["balanced"] = bool(balanced)
    balanced_rows = sampler["identities_per_batch"] * sampler["images_per_identity"] if balanced else 0
    if balanced_rows + kd["unlabeled"]["per_batch"] >= cfg.batch_size:
        raise _fail("kd.sampler", dict(sampler), f"P x K = {sampler['identities_per_batch']} x "
                                                 f"{sampler['images_per_identity']} (when balanced) plus "
                                                 f"kd.unlabeled.per_batch = {kd['unlabeled']['per_batch']} must leave "
                                                 f"room for random samples in batch_size {cfg.batch_size}")
    for key in ("rec", "num_classes"):
        if cfg[key] in (None, "", []):
            raise _fail(key, cfg[key], "required (the training data and its number of classes)")
    if not isinstance(cfg.rec, (str, os.PathLike)) and not (
            isinstance(cfg.rec, (list, tuple)) and all(isinstance(r, (str, os.PathLike)) for r in cfg.rec)):
        raise _fail("rec", cfg.rec, "expected a path, or a list of paths of labelled sets (their labels follow one "
                                    "another in one class space; num_classes is their total)")
    if cfg.dali or cfg.dali_aug:
        key = "dali" if cfg.dali else "dali_aug"
        raise _fail(key, cfg[key], "kd_plugin reads train.rec itself (the teacher needs every batch's sample "
                                   "indices and flips, which DALI's pipeline does not give): set dali = False and "
                                   "dali_aug = False")
    if not isinstance(cfg.gradient_acc, int) or cfg.gradient_acc < 1:
        raise _fail("gradient_acc", cfg.gradient_acc, "expected an integer >= 1 (steps whose gradients are summed "
                                                      "before each optimizer step)")
    if cfg.amp_dtype not in AMP_DTYPES:
        raise _fail("amp_dtype", cfg.amp_dtype, f"allowed: {', '.join(AMP_DTYPES)} (used when fp16 = True)")
    if cfg.amp_dtype != "float16" and not cfg.fp16:
        raise _fail("amp_dtype", cfg.amp_dtype, "applies only with fp16 = True (mixed precision); set fp16 = True or "
                                                "remove amp_dtype")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise _fail("optimizer", cfg.optimizer, "allowed: 'sgd', 'adamw'")
    if not 0 < float(cfg.sample_rate) <= 1:
        raise _fail("sample_rate", cfg.sample_rate, "must be in (0, 1]")
    cfg.kd = EasyDict(kd)
    return cfg


def check_against_data(cfg: EasyDict, dataset) -> None:
    """The settings read against the training data, in both ways in: `num_classes` must be the data's, and a
    `num_image` that contradicts the data is refused (the epoch length comes from the data)."""
    if dataset.num_classes != cfg.num_classes:
        raise KDPluginError(f"config.num_classes = {cfg.num_classes} but {cfg.rec} has {dataset.num_classes} "
                            f"classes; set num_classes to match the data")
    num_images = dataset.num_labeled
    if cfg.num_image and int(cfg.num_image) != num_images:
        raise KDPluginError(f"config.num_image = {cfg.num_image} but {cfg.rec} has {num_images} images; set num_image "
                            f"to match the data, or leave it unset (0 or None): the epoch length comes from the data")


def check_trainer_keys(cfg: EasyDict) -> None:
    """`kd-plugin train` refuses top-level keys it would not honour (under train_v2, upstream reads them itself)."""
    if cfg.get("using_wandb"):
        raise _fail("using_wandb", cfg.using_wandb, "kd-plugin train does not log to wandb (its logs are "
                                                    "<output>/training.log, train_log.jsonl and tensorboard): set "
                                                    "using_wandb = False, or train under arcface_torch's train_v2.py "
                                                    "with the one-line hook")
    unknown = sorted(set(cfg) - set(BASE) - set(WANDB_KEYS) - {"kd"})
    if unknown:
        raise _fail(unknown[0], cfg[unknown[0]], f"unknown key: kd-plugin train reads {', '.join(sorted(BASE))} and "
                                                 f"config.kd; remove it or fix its spelling")


def check_hook_keys(cfg: EasyDict) -> None:
    """Under train_v2 the hook refuses kd_plugin settings that only `kd-plugin train` honours."""
    student_norm = (cfg.kd.student_mean, cfg.kd.student_std)
    if student_norm != (127.5, 127.5):
        raise _fail("kd.student_mean/student_std", student_norm, "under train_v2 the student sees arcface_torch's "
                                                                  "own normalisation (x - 127.5) / 127.5: remove "
                                                                  "them (they apply to kd-plugin train only)")
    if not isinstance(cfg.rec, (str, os.PathLike)) and cfg.val_targets:
        raise _fail("val_targets", cfg.val_targets, "train_v2 looks for them in the folder config.rec names, and "
                                                    "config.rec is a list of sets here: give val_targets as paths under "
                                                    "kd-plugin train, or drop them under train_v2")
    if cfg.kd.views.enabled:
        raise _fail("kd.views.enabled", True, "under train_v2 upstream's data loader makes the images the student "
                                              "sees; consistent views apply to kd-plugin train only: remove kd.views")
    own = {"amp_dtype": "float16", "max_steps": None, "checkpoint_every": BASE["checkpoint_every"]}
    for key, default in own.items():
        if cfg[key] != default:
            raise _fail(key, cfg[key], "a kd-plugin train setting; under train_v2 upstream's loop decides "
                                       "(fp16 with its GradScaler, num_epoch, a checkpoint per epoch): remove it")


_READING = contextvars.ContextVar("kd_plugin_reading_config", default=False)


def read_by_kd_plugin() -> bool:
    """Whether the config being imported is read by kd_plugin itself (`load_config`), not by arcface_torch."""
    return _READING.get()


def load_config(path: str) -> EasyDict:
    """Import a python config file defining `config` (an EasyDict or dict), as arcface_torch's configs do."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"kd_plugin_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    reading = _READING.set(True)  # its distill(...) line then only fills in config.kd
    try:
        spec.loader.exec_module(module)
    finally:
        _READING.reset(reading)
    if not hasattr(module, "config"):
        raise KDPluginError(f"{path}: defines no `config` (an easydict.EasyDict, as arcface_torch configs do)")
    cfg = resolve(module.config)
    if cfg.output is None:
        cfg.output = os.path.join("work_dirs", os.path.splitext(os.path.basename(path))[0])
    return cfg
