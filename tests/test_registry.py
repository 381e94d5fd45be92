"""One declaration per method: a user's own term registered from a config file trains by name; the registry refuses
what it could not honour; config, CLI, benchmark and demo read it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kd_plugin.methods import registry
from kd_plugin.run.config import load_config, resolve
from kd_plugin.errors import KDPluginError
from kd_plugin.methods.registry import register_term
from test_train import _config, _registered_for_this_module, _teacher, ensure_registered, make_faces  # noqa: F401

USER_CONFIG = '''
import torch
from easydict import EasyDict

from kd_plugin import register_term


@register_term("power_cosine", weight=2.0, needs=("teacher", "equal_dims"))
class PowerCosine(torch.nn.Module):
    """mean((1 - cos(student, teacher)) ** power): a user's own term."""

    def __init__(self, power=1.0):
        super().__init__()
        self.power = float(power)

    def forward(self, student, teacher, labels):
        cos = torch.nn.functional.cosine_similarity(student, teacher, dim=1)
        loss = ((1.0 - cos) ** self.power).mean()
        return loss, {{"power_cosine_power": torch.tensor(self.power), "power_cosine_rows": torch.tensor(float(len(cos)))}}


config = EasyDict({config!r})
config.max_steps = 2
config.kd = {{"method": "proxyless+power_cosine", "teacher": {teacher!r}, "proxyless": {{"centres": "estimate"}},
             "power_cosine": {{"power": 3.0}}}}
'''


@pytest.fixture(autouse=True)
def _restore_registry():
    """Each test leaves the registry as the other tests expect it (built-ins only)."""
    import kd_plugin.methods  # noqa: F401  (the built-ins are registered)

    ensure_registered()
    with registry.restored():
        yield


def _write_user_config(tmp_path) -> str:
    data = make_faces(tmp_path / "faces")
    config = _config(data, tmp_path / "out")
    config.pop("kd")
    path = tmp_path / "job_with_own_term.py"
    path.write_text(USER_CONFIG.format(config=config, teacher=_teacher(tmp_path)))
    return str(path)


def test_a_term_registered_in_a_config_file_trains_two_steps_by_name(tmp_path):
    from kd_plugin.run.train import train

    path = _write_user_config(tmp_path)
    cfg = load_config(path)
    assert cfg.kd.terms == {"power_cosine": 2.0} and cfg.kd.head == "proxyless"  # its declared default weight
    assert cfg.kd.power_cosine == {"power": 3.0}  # its block: the constructor's defaults, overridden by the config
    assert train(path) == {"stopped": "done", "global_step": 2}
    with open(os.path.join(cfg.output, "train_log.jsonl")) as f:
        steps = [e for e in map(json.loads, f) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for e in steps:
        assert e["power_cosine_power"] == 3.0 and e["power_cosine_rows"] == 8.0  # built from its block, global batch
        assert e["loss"] == pytest.approx(e["loss_head"] + 2.0 * e["loss_power_cosine"], rel=1e-6)
        assert 0.0 < e["loss_power_cosine"] < 8.0
    assert load_config(path).kd.terms == {"power_cosine": 2.0}  # loading the config again re-registers it


def test_a_user_terms_settings_are_checked_like_the_built_ins(tmp_path):
    load_config(_write_user_config(tmp_path))
    base = {"rec": "x", "num_classes": 2}
    with pytest.raises(KDPluginError, match=r"config.kd.power_cosine.powr = 3: unknown key; allowed: power"):
        resolve(dict(base, kd={"method": "power_cosine", "teacher": "t.onnx", "power_cosine": {"powr": 3}}))
    with pytest.raises(KDPluginError, match="config.kd.teacher = None: method 'power_cosine' needs the teacher"):
        resolve(dict(base, kd={"method": "power_cosine"}))
    with pytest.raises(KDPluginError, match=r"config.kd.weights.power_cosin = 1.0: no term 'power_cosin'"):
        resolve(dict(base, kd={"method": "power_cosine", "teacher": "t.onnx", "weights": {"power_cosin": 1.0}}))


def test_the_registry_refuses_declarations_it_could_not_honour():
    class Term(torch.nn.Module):
        def __init__(self, alpha=1.0):
            super().__init__()

    with pytest.raises(KDPluginError, match="'ekd' is kd_plugin's EKD"):
        register_term("ekd")(Term)
    with pytest.raises(KDPluginError, match="a method name is lower-case"):
        register_term("My+Term")(Term)
    with pytest.raises(KDPluginError, match=r"needs \['gpu'\] unknown"):
        register_term("gpu_term", needs=("gpu",))(Term)

    class Required(torch.nn.Module):
        def __init__(self, alpha):
            super().__init__()

    with pytest.raises(KDPluginError, match=r"parameters \['alpha'\] have no default"):
        register_term("required_term")(Required)
    with pytest.raises(KDPluginError, match="a term receives no class centres"):
        register_term("centred_term", needs=("teacher", "centres"))(Term)
    with pytest.raises(KDPluginError, match="needs 'logits', but only a term with `sharded = True`"):
        register_term("logit_term", needs=("teacher", "logits"))(Term)
    register_term("one_name")(Term)

    class Other(torch.nn.Module):
        pass

    with pytest.raises(KDPluginError, match="registered 'one_name' already"):
        register_term("one_name")(Other)
    for reserved in ("sampler", "terms"):
        register_term(reserved, needs=())(Term)
        with pytest.raises(KDPluginError, match=f"has the name of the config.kd setting '{reserved}'"):
            resolve({"rec": "x", "num_classes": 2})
        registry.unregister(reserved)


def test_a_built_in_never_silently_replaces_a_users_term_of_its_name():
    """A config may register before the built-ins are imported: the built-in's registration then stops, naming the
    user's term, instead of replacing it."""
    from kd_plugin.methods.losses.embedding import L2Loss

    class Mine(torch.nn.Module):
        pass

    registry.unregister("l2")
    register_term("l2")(Mine)
    with pytest.raises(KDPluginError, match=r"test_registry.*Mine registered 'l2', the name of kd_plugin's built-in L2"):
        registry.add_term("l2", L2Loss, weight=100.0, needs=("teacher", "equal_dims"), title="L2", _builtin=True)


def test_a_term_without_the_teacher_trains_without_one_and_equal_dims_is_enforced_for_every_term(tmp_path):
    from kd_plugin.run.train import Trainer

    @register_term("spread", weight=0.5, needs=())
    class Spread(torch.nn.Module):
        """A label-free, teacher-free regulariser: the batch's mean squared cosine."""

        def forward(self, student, teacher, labels):
            assert teacher is None
            unit = torch.nn.functional.normalize(student, dim=1)
            loss = (unit @ unit.T).pow(2).mean()
            return loss, {}

    data = make_faces(tmp_path / "faces")
    trainer = Trainer(resolve(_config(data, tmp_path / "out", max_steps=2, kd={"method": "spread"})))
    assert trainer.teacher is None and not trainer.objective.needs_teacher
    assert trainer.run()["global_step"] == 2

    @register_term("direct", needs=("teacher", "equal_dims"))
    class Direct(torch.nn.Module):
        def forward(self, student, teacher, labels):
            return (student - teacher).pow(2).mean(), {}

    wide = _config(data, tmp_path / "wide", max_steps=1, embedding_size=32,
                   kd={"method": "direct", "teacher": _teacher(tmp_path)})  # the teacher's embeddings are 16-d
    with pytest.raises(KDPluginError, match="direct: the student's embeddings have 32 dims, the teacher's 16"):
        Trainer(resolve(wide)).run()


def test_config_cli_benchmark_and_demo_read_the_registry(capsys):
    from kd_plugin.benchmarks import celeba_rows
    from kd_plugin.cli import main
    from kd_plugin.run.config import kd_defaults
    from kd_plugin.demo import demo_methods
    from kd_plugin.methods import kd_block, methods

    catalogue = methods()
    assert {n for n, m in catalogue.items() if m.kind == "head"} == {"proxyless", "adadistill", "proxyless_adaptive"}
    assert kd_defaults()["ekd"]["top_k"] == 2000 and kd_defaults()["cckd"] == {"gamma": 0.4, "order": 2}
    assert demo_methods() == ("none", "proxyless", "ekd", "proxyless+ekd")
    assert set(celeba_rows.registry_rows()) == {"student", "proxyless+ekd"} | {
        n for n, m in catalogue.items() if "logits" not in m.needs and m.teacher is None}
    assert kd_block("proxyless+ekd", teacher="t") == {"method": "proxyless+ekd", "teacher": "t",
                                                    "proxyless": {"centres": "estimate"}}
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(f"\n{name} " in "\n" + listing for name in catalogue)
    assert "config.kd.rkd = {'distance_weight': 25.0, 'angle_weight': 50.0}" in listing
