"""ProxylessKD's settings live in the block of the head that inherits the centres (config.kd.proxyless,
config.kd.proxyless_adaptive); the keys of kd_plugin <= 0.5 (kd.centres, kd.centre_dtype, kd.centre_fit) still work,
with a FutureWarning naming the new key, and a method's block is refused when the method does not run."""

import warnings

import pytest

from kd_plugin.errors import KDPluginError
from kd_plugin.run.config import resolve

BASE = {"rec": "x", "num_classes": 4}


def _kd(**kd):
    return resolve(dict(BASE, kd=dict({"teacher": "t.onnx"}, **kd))).kd


def test_the_old_keys_land_in_the_heads_block_with_a_warning_naming_the_new_key():
    new = _kd(method="proxyless+ekd", proxyless={"centres": "fit", "dtype": "float16",
                                                 "fit": {"epochs": 3, "batch_size": 64, "lr": 0.2}})
    with pytest.warns(FutureWarning) as seen:
        old = _kd(method="proxyless+ekd", centres="fit", centre_dtype="float16",
                  centre_fit={"epochs": 3, "batch_size": 64, "lr": 0.2})
    messages = [str(w.message) for w in seen]
    assert len(messages) == 3
    for key, moved in (("centres", "centres"), ("centre_dtype", "dtype"), ("centre_fit", "fit")):
        assert any(f"config.kd.{key} is now config.kd.proxyless.{moved}" in m for m in messages), (key, messages)
    assert old.proxyless == new.proxyless == {"centres": "fit", "dtype": "float16",
                                              "fit": {"epochs": 3, "batch_size": 64, "lr": 0.2}}
    assert "centres" not in old and "centre_dtype" not in old and "centre_fit" not in old
    with pytest.warns(FutureWarning, match=r"config.kd.centres is now config.kd.proxyless_adaptive.centres"):
        adaptive = _kd(method="proxyless_adaptive+ekd", centres="estimate")
    assert adaptive.proxyless_adaptive.centres == "estimate"


def test_the_new_keys_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd = _kd(method="proxyless", proxyless={"centres": "c.pt"})
    assert kd.proxyless == {"centres": "c.pt", "dtype": "float32", "fit": {"epochs": 20, "batch_size": 256, "lr": 0.1}}


@pytest.mark.parametrize("kd, message", [
    ({"method": "proxyless", "centres": "a.pt", "proxyless": {"centres": "b.pt"}},
     r"config.kd.centres = 'a.pt': config.kd.proxyless.centres = 'b.pt' is set too"),
    ({"method": "ekd", "centres": "estimate"},
     r"config.kd.centres = 'estimate': a setting of the head that inherits the teacher's class centres \(proxyless, "
     r"proxyless_adaptive\), and method 'ekd' has none"),
    ({"method": "proxyless_adaptive", "centres": "estimate", "centre_dtype": "float16"},
     r"config.kd.centre_dtype = 'float16': ProxylessKD, adaptive centres \(config.kd.proxyless_adaptive\) has no "
     r"'dtype' setting"),
    ({"method": "adadistill", "proxyless": {"centres": "c.pt"}},
     r"config.kd.proxyless = .*the settings of ProxylessKD, and method 'adadistill' does not run it"),
    ({"method": "proxyless", "proxyless": {"centres": "c.pt"}, "ekd": {"memory": 64}},
     r"config.kd.ekd = .*the settings of EKD, and method 'proxyless' does not run it"),
    ({"method": "proxyless", "proxyless": {"centres": "fit", "fit": {"epochs": 0, "batch_size": 8, "lr": 0.1}}},
     r"config.kd.proxyless.fit = .*epochs >= 1"),
])
def test_misplaced_or_doubled_settings_are_refused_naming_the_key(kd, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(KDPluginError, match=message):
            _kd(**kd)


def test_the_old_defaults_left_in_a_config_without_proxyless_are_dropped_with_the_warning():
    with pytest.warns(FutureWarning, match="config.kd.centre_dtype"):
        kd = _kd(method="ekd", centre_dtype="float32")
    assert "centre_dtype" not in kd and kd.proxyless.dtype == "float32"


def test_a_head_that_inherits_centres_must_declare_their_block():
    from kd_plugin.methods.registry import register_head, restored

    with restored(), pytest.raises(KDPluginError, match=r"registering head 'my_inheriting' .* must have the keys "
                                                        r"\['fit'\] \(start from kd_plugin.methods.heads.CENTRE_BLOCK"):
        register_head("my_inheriting", lambda cfg, centres: None, defaults={"centres": None}, needs=("centres",))
