"""The one-line hook: what `distill` does outside and inside train_v2.py, and a real upstream run when available."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from easydict import EasyDict

from conftest import CPU_HARNESS, UPSTREAM_PYTHON, UPSTREAM_ROOT, shared
from processes import assert_every_rank_ok, torchrun_command
from kd_plugin import distill
from test_train import _registered_for_this_module  # noqa: F401 (autouse: the test_tiny network, this module only)
from kd_plugin.errors import KDPluginError

ROOT, PYTHON, SHIM = UPSTREAM_ROOT, UPSTREAM_PYTHON, str(CPU_HARNESS)  # PYTHON runs upstream (mxnet, numpy<=1.23.5)


def test_outside_train_v2_it_fills_config_kd_and_warns_that_distillation_is_not_active():
    config = EasyDict(rec="x", num_classes=3)
    with pytest.warns(UserWarning, match=r"distillation is NOT active: .* defines none of get_dataloader, get_model, "
                                         r"PartialFC_V2"):
        distill(config, teacher="r100:t.pth", method="proxyless+ekd", centres="estimate")
    assert config.kd == {"method": "proxyless+ekd", "teacher": "r100:t.pth", "proxyless": {"centres": "estimate"}}


def test_a_config_kd_plugin_reads_itself_fills_config_kd_without_a_warning(tmp_path):
    import warnings

    from kd_plugin.run.config import load_config

    job = tmp_path / "job.py"
    job.write_text("from easydict import EasyDict\nfrom kd_plugin import distill\n"
                   "config = EasyDict(rec='x', num_classes=3)\n"
                   "distill(config, teacher='t.onnx', method='proxyless', centres='estimate')\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(str(job))
    assert cfg.kd.method == "proxyless" and cfg.kd.teacher == "t.onnx"


def _fake_train_v2(monkeypatch, path):
    fake = types.ModuleType("__main__")
    fake.__file__ = str(path)
    fake.get_model, fake.get_dataloader, fake.PartialFC_V2 = object(), object(), object()
    monkeypatch.setitem(sys.modules, "__main__", fake)
    return fake


@pytest.mark.parametrize("name", ["train_v2_kd.py", "launch.py"])
def test_train_v2_is_recognised_by_the_names_it_patches_whatever_the_file_is_called(monkeypatch, tmp_path, name):
    from test_train import make_faces

    fake = _fake_train_v2(monkeypatch, tmp_path / name)
    originals = (fake.get_model, fake.get_dataloader, fake.PartialFC_V2)
    config = EasyDict(rec=str(make_faces(tmp_path / "faces")), num_classes=8, num_image=0, output=str(tmp_path / "o"))
    distill(config, teacher="t.onnx", method="ekd")
    assert all(new is not old for new, old in zip((fake.get_model, fake.get_dataloader, fake.PartialFC_V2), originals))


def test_the_hook_checks_the_config_against_the_data_as_kd_plugin_train_does(monkeypatch, tmp_path):
    from test_train import make_faces

    _fake_train_v2(monkeypatch, tmp_path / "train_v2.py")
    faces = str(make_faces(tmp_path / "faces"))  # 8 identities
    with pytest.raises(KDPluginError, match=r"config.num_classes = 9 but .* has 8 classes; set num_classes to match"):
        distill(EasyDict(rec=faces, num_classes=9, num_image=0, output=str(tmp_path / "a")), teacher="t.onnx",
                method="ekd")
    with pytest.raises(KDPluginError, match=r"config.num_image = 5 but .* has \d+ images"):
        distill(EasyDict(rec=faces, num_classes=8, num_image=5, output=str(tmp_path / "b")), teacher="t.onnx",
                method="ekd")


def test_a_train_v2_without_the_names_it_patches_stops_clearly(monkeypatch, tmp_path):
    fake = types.ModuleType("__main__")
    fake.__file__ = str(tmp_path / "train_v2.py")
    fake.get_model, fake.get_dataloader = object(), object()  # PartialFC_V2 renamed upstream, say
    monkeypatch.setitem(sys.modules, "__main__", fake)
    with pytest.raises(KDPluginError, match="has no 'PartialFC_V2' to replace; the hook supports insightface"):
        distill(EasyDict(rec="x", num_classes=3), teacher="t.onnx", method="ekd")


def UPSTREAM(test):
    """Runs unchanged upstream train_v2 (skips, or fails under CI=true, without it); grouped on one xdist worker."""
    return pytest.mark.xdist_group("upstream_train_v2")(pytest.mark.usefixtures("needs_upstream")(test))


def _celeba_subset(tmp_path, identities):
    """The first `identities` identities of the shared CelebA training set, packed as an insightface train.rec."""
    data = shared("celeba", "train.rec")
    subset = tmp_path / "celeba_sub"
    script = ("import os\nfrom kd_plugin.data import open_dataset\nfrom kd_plugin.data.pack import pack_dataset\n"
              f"ds = open_dataset({str(data)!r})\nroot = {str(tmp_path / 'images')!r}\n"
              f"for i in range(len(ds)):\n    c = int(ds.labels[i])\n    if c < {identities}:\n"
              "        os.makedirs(f'{root}/{c:03d}', exist_ok=True)\n"
              "        open(f'{root}/{c:03d}/{i}.jpg', 'wb').write(ds.read_bytes(i))\n"
              f"pack_dataset(open_dataset(root), {str(subset)!r}, progress=False)\n"
              f"print(len(open_dataset({str(subset)!r})))\n")
    out = subprocess.run([PYTHON, "-c", script], check=True, capture_output=True, text=True)
    return subset, int(out.stdout.split()[-1])


def _upstream(name, config_text, world, logs):
    """Start unchanged upstream train_v2.py on `configs/<name>.py` under the CPU harness (strict device mode), each
    rank's output in `logs` (tests/processes.py)."""
    config_path = os.path.join(ROOT, "configs", f"{name}.py")
    with open(config_path, "w") as f:
        f.write(config_text)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SHIM), OMP_NUM_THREADS="1")
    env.pop("KD_CPU_SHIM_LAX", None)
    proc = subprocess.Popen(torchrun_command(world, logs, "train_v2.py", f"configs/{name}", python=PYTHON), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.world, proc.logs = world, logs
    return proc


def _finish(proc, config_name):
    try:
        out, _ = proc.communicate(timeout=1500)
    finally:
        os.remove(os.path.join(ROOT, "configs", f"{config_name}.py"))
    assert_every_rank_ok(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), proc.logs, proc.world)
    return out


def _job(output, subset, classes, epochs, resume, kd_call):
    return f"""from easydict import EasyDict as edict
config = edict(margin_list=(1.0, 0.5, 0.0), network="mbf", resume={resume}, output={str(output)!r},
               embedding_size=128, sample_rate=1.0, fp16=False, batch_size=32, lr=0.1, verbose=2000, dali=False,
               rec={str(subset)!r}, num_classes={classes}, num_image=0, num_epoch={epochs}, warmup_epoch=0,
               val_targets=[], num_workers=1, save_all_states=True, frequent=2)
from kd_plugin import distill; {kd_call}
"""


def _check(output, world, steps_per_epoch, epochs):
    """model.pt loads into upstream's mbf; every rank ran epochs x ceil(N / (W x R)) steps; EKD thresholds agree."""
    check = ("import torch, sys\nsys.path.insert(0, '.')\nfrom backbones import get_model\n"
             f"sd = torch.load({str(output / 'model.pt')!r}, weights_only=True)\n"
             "get_model('mbf', fp16=False, num_features=128).load_state_dict(sd, strict=True)\n"
             f"cks = [torch.load({str(output)!r} + f'/checkpoint_gpu_{{r}}.pt', weights_only=True) for r in range({world})]\n"
             f"assert all(ck['global_step'] == {steps_per_epoch * epochs} for ck in cks), [c['global_step'] for c in cks]\n"
             "fc = [ck['state_dict_softmax_fc'] for ck in cks]\n"
             "assert all(int(f['kd_step']) == cks[0]['global_step'] for f in fc)\n"
             "for key in [k for k in fc[0] if k.endswith('_anchors')]:\n"
             "    assert all(torch.equal(f[key], fc[0][key]) for f in fc), key\n"
             "print('ok')\n")
    out = subprocess.run([PYTHON, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


def _kd_log(output):
    with open(output / "train_log.jsonl") as f:
        return [json.loads(line) for line in f]


@UPSTREAM
@pytest.mark.parametrize("world", [1, 2], ids=["1process", "2processes"])
def test_unchanged_upstream_train_v2_distils_with_one_line(tmp_path, world):
    """proxyless+ekd from the shared ONNX teacher, 2 epochs, under strict device mode."""
    teacher = shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx")
    subset, n = _celeba_subset(tmp_path, 6)
    name = f"_kd_plugin_hook_test_{os.getpid()}_{world}"
    kd_call = (f"distill(config, teacher={str(teacher)!r}, method='proxyless+ekd', "
               "teacher_mean='123.675,116.28,103.53', teacher_std='58.395,57.12,57.375', centres='estimate', "
               "margin_on_random_part=True, sampler=dict(identities_per_batch=4, images_per_identity=4))")
    output = tmp_path / "run"
    _finish(_upstream(name, _job(output, subset, 6, 2, False, kd_call), world, tmp_path / "logs"), name)
    steps = -(-n // (world * 16))  # the balanced sampler's epoch: R = 32 - 4 x 4 random images per rank
    _check(output, world, steps, 2)
    figures = [e for e in _kd_log(output) if "loss" in e]
    assert [e["step"] for e in figures] == list(range(2, 2 * steps + 1, 2))
    assert {"loss_head", "loss_ekd"} <= set(figures[0]) and (output / "training.log").read_text().count("KD step") \
        == len(figures)


@UPSTREAM
def test_upstream_multistep_kd_killed_and_resumed_switches_teacher_each_epoch(tmp_path):
    """2 processes, multi-step KD over 3 teacher checkpoints, killed during epoch 2 and resumed with resume=True."""
    import time

    from kd_plugin.networks import create_network

    subset, n = _celeba_subset(tmp_path, 6)
    for epoch in (1, 2, 3):
        torch.manual_seed(epoch)
        torch.save(create_network("mbf", 128).state_dict(), tmp_path / f"teacher_e{epoch}.pth")
    name = f"_kd_plugin_hook_multistep_{os.getpid()}"
    kd_call = (f"distill(config, teacher='mbf', method='multistep', multistep=dict(checkpoints="
               f"{str(tmp_path / 'teacher_e{epoch}.pth')!r}), sampler=dict(identities_per_batch=4, "
               "images_per_identity=4, balanced=True))")
    output = tmp_path / "run"
    proc = _upstream(name, _job(output, subset, 6, 3, False, kd_call), 2, tmp_path / "logs_killed")
    steps = -(-n // (2 * 16))
    deadline = time.time() + 1200
    try:  # wait until epoch 1 has saved its checkpoint and epoch 2 has started, then kill the whole job
        while time.time() < deadline and proc.poll() is None:
            if output.joinpath("train_log.jsonl").exists() and any(
                    e.get("epoch") == 1 and "teacher" in e for e in _kd_log(output)):
                break
            time.sleep(1)
        # torchrun's workers run in sessions of their own: kill every process of this job by its config
        subprocess.run(["pkill", "-KILL", "-f", f"configs/{name}"], check=False)
        proc.communicate()
        while subprocess.run(["pgrep", "-f", f"configs/{name}"], capture_output=True).returncode == 0:
            time.sleep(0.5)
    finally:
        os.remove(os.path.join(ROOT, "configs", f"{name}.py"))
    assert torch.load(output / "checkpoint_gpu_1.pt", weights_only=True)["epoch"] == 1
    _finish(_upstream(name, _job(output, subset, 6, 3, True, kd_call), 2, tmp_path / "logs_resumed"), name)
    _check(output, 2, steps, 3)
    switches = [(e["epoch"], os.path.basename(e["teacher"])) for e in _kd_log(output) if "teacher" in e]
    # epoch 1 started before the kill and again after the resume
    assert switches == [(0, "teacher_e1.pth"), (1, "teacher_e2.pth"), (1, "teacher_e2.pth"), (2, "teacher_e3.pth")]
    figures = {e["step"] for e in _kd_log(output) if "loss" in e}
    assert set(range(2, 3 * steps + 1, 2)) <= figures


SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def _count_syncs(patch):
    """Count the calls that make the host wait for the device (a tensor read back), by name."""
    counts = {name: 0 for name in SYNCS}
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(self, *args, **kwargs)
        patch.setattr(torch.Tensor, name, spy)
    return counts


def _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path, **kd):
    from test_train import TinyStudent, make_faces

    fake = types.ModuleType("__main__")
    fake.__file__ = str(tmp_path / "train_v2.py")
    fake.get_model, fake.get_dataloader, fake.PartialFC_V2 = object(), object(), object()
    monkeypatch.setitem(sys.modules, "__main__", fake)
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    config = EasyDict(rec=str(make_faces(tmp_path / "faces")), num_classes=8, embedding_size=16, batch_size=6,
                      frequent=3, num_image=0, output=str(tmp_path / "out"))
    distill(config, teacher=f"test_tiny:{tmp_path / 'teacher.pth'}", method="ekd",
            sampler=dict(identities_per_batch=1, images_per_identity=2), **kd)
    return config, fake.PartialFC_V2(None, 16, 8, 1.0, False)


def test_the_hooks_head_keeps_fp32_logits_as_train_v2_asks_even_with_fp16(monkeypatch, tmp_path):
    from test_train import TinyStudent, make_faces

    fake = _fake_train_v2(monkeypatch, tmp_path / "train_v2.py")
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    config = EasyDict(rec=str(make_faces(tmp_path / "faces")), num_classes=8, embedding_size=16, batch_size=6,
                      num_image=0, fp16=True, output=str(tmp_path / "out"))
    distill(config, teacher=f"test_tiny:{tmp_path / 'teacher.pth'}", method="proxyless", centres="estimate",
            sampler=dict(identities_per_batch=1, images_per_identity=2))
    assert fake.PartialFC_V2(None, 16, 8, 1.0, False).objective.head.fp16 is False  # what train_v2 passes
    assert fake.PartialFC_V2(None, 16, 8, 1.0, True).objective.head.fp16 is True


def test_the_hook_honours_margin_on_random_part(monkeypatch, tmp_path):
    _, head = _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path, margin_on_random_part=True)
    assert head.objective.margin_random_rows == 4  # batch 6 - 1 identity x 2 images
    _, head = _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path)
    assert head.objective.margin_random_rows is None


def test_the_hook_logs_its_scalars_every_frequent_steps_with_one_sync(monkeypatch, tmp_path):
    config, head = _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path)
    torch.manual_seed(0)
    images = torch.rand(6, 3, 112, 112) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 4, 4])
    head.shared.images = images

    def steps(n, direct=False):
        with pytest.MonkeyPatch.context() as patch:
            counts = _count_syncs(patch)
            for _ in range(n):
                emb = torch.randn(6, 16, requires_grad=True)
                if direct:
                    teacher = torch.as_tensor(head._teacher.embedder.embed(
                        (images * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8))).float()
                    head.objective(emb, labels, teacher)
                else:
                    head(emb, labels)
        return counts

    objective_alone = steps(1, direct=True)  # what the objective and the teacher need by themselves
    steps(1)  # step 1 (frequent = 3) reads the resumable step count once
    assert steps(1) == objective_alone  # step 2: nothing more than the objective's own
    at_log = steps(1)  # step 3: the means are read back once
    assert at_log == dict(objective_alone, tolist=objective_alone["tolist"] + 1)
    log = [json.loads(line) for line in open(os.path.join(config.output, "train_log.jsonl"))]
    assert [e["step"] for e in log] == [3] and {"loss", "loss_head", "loss_ekd"} <= set(log[0])


@pytest.mark.parametrize("kd, top, message", [
    ({"student_mean": 0.0}, {}, r"config.kd.student_mean/student_std = \(0.0, 127.5\): under train_v2 the student"),
    ({}, {"amp_dtype": "bfloat16", "fp16": True}, r"config.amp_dtype = 'bfloat16': a kd-plugin train setting; under "
                                                  r"train_v2"),
    ({}, {"max_steps": 10}, r"config.max_steps = 10: a kd-plugin train setting"),
])
def test_under_train_v2_settings_only_the_trainer_honours_are_refused(monkeypatch, tmp_path, kd, top, message):
    fake = types.ModuleType("__main__")
    fake.__file__ = str(tmp_path / "train_v2.py")
    fake.get_model, fake.get_dataloader, fake.PartialFC_V2 = object(), object(), object()
    monkeypatch.setitem(sys.modules, "__main__", fake)
    from test_train import make_faces
    config = EasyDict(rec=str(make_faces(tmp_path / "faces")), num_classes=8, num_image=0, **top)
    with pytest.raises(KDPluginError, match=message):
        distill(config, teacher="t.onnx", method="ekd", **kd)


def test_an_unset_output_becomes_upstreams_default(monkeypatch, tmp_path):
    """arcface_torch's get_config sets output = work_dirs/<job name> after importing the job config; the hook's
    logs and estimated centres must go where upstream writes model.pt."""
    from test_train import make_faces
    fake = types.ModuleType("__main__")
    fake.__file__ = str(tmp_path / "train_v2.py")
    fake.get_model, fake.get_dataloader, fake.PartialFC_V2 = object(), object(), object()
    monkeypatch.setitem(sys.modules, "__main__", fake)
    monkeypatch.delitem(sys.modules, "configs.base", raising=False)
    job = {"__name__": "configs.ms1mv3_mbf_kd", "EasyDict": EasyDict, "distill": distill,
           "rec": str(make_faces(tmp_path / "faces"))}
    exec("config = EasyDict(rec=rec, num_classes=8, num_image=0, output=None)\n"
         "distill(config, teacher='t.onnx', method='ekd')\n", job)
    assert job["config"].output == os.path.join("work_dirs", "ms1mv3_mbf_kd")


def test_the_hook_sums_its_figures_on_the_heads_device(monkeypatch, tmp_path):
    """EKD reports some figures as CPU scalars; on a GPU the others are CUDA tensors and one stack of both fails.
    The meta device stands in for CUDA here."""
    from kd_plugin.training_log import StepLog

    _, head = _hook_head_under_a_fake_train_v2(monkeypatch, tmp_path)
    assert head.kd.log.device == torch.device("cpu")  # the training device here
    head.kd.log = StepLog(torch.device("meta"))
    head.kd.log.add({"on_cpu": torch.tensor(2.0), "elsewhere": torch.tensor(1.0, device="meta")},
                    torch.tensor(3.0, device="meta"))
    assert {v.device.type for v in head.kd.log.sums.values()} == {"meta"}


@pytest.mark.parametrize("save_all_states", [None, False, True], ids=["unset", "off", "on"])
def test_the_hook_says_at_its_first_call_when_save_all_states_is_off(monkeypatch, tmp_path, caplog, save_all_states):
    """arcface_torch's base.py leaves it False: no shards, no KD state on resume. The note reaches training.log."""
    from test_train import TinyStudent, make_faces

    fake = _fake_train_v2(monkeypatch, tmp_path / "train_v2.py")
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    config = EasyDict(rec=str(make_faces(tmp_path / "faces")), num_classes=8, embedding_size=16, batch_size=6,
                      num_image=0, output=str(tmp_path / "out"))
    if save_all_states is not None:
        config.save_all_states = save_all_states
    distill(config, teacher=f"test_tiny:{tmp_path / 'teacher.pth'}", method="ekd",
            sampler=dict(identities_per_batch=1, images_per_identity=2))
    with caplog.at_level("WARNING", logger="kd_plugin"):
        fake.get_dataloader(config.rec, 0, 6, seed=2048)
    noted = [r.getMessage() for r in caplog.records if "save_all_states is False" in r.getMessage()]
    assert len(noted) == (0 if save_all_states else 1)
    if noted:
        assert "no checkpoint_gpu_{rank}.pt" in noted[0] and "Set config.save_all_states = True" in noted[0]


def test_the_hook_puts_kd_plugins_verification_in_place_of_upstreams_when_asked(monkeypatch, tmp_path, caplog):
    """Upstream's verification fails on current scipy; the hook says so at the first call, and with
    verifier='kd_plugin' train_v2's CallBackVerification is kd_plugin's, logging as upstream's does."""
    import shutil

    from test_train import TinyStudent, make_faces

    from kd_plugin.run.hook_verification import KDPluginVerification, upstream_verification_fails

    faces = make_faces(tmp_path / "faces")
    shutil.copy(shared("celeba", "celeba_val.bin"), faces / "celeba_val.bin")  # train_v2 reads <rec>/<name>.bin
    torch.save(TinyStudent(16).state_dict(), tmp_path / "teacher.pth")
    for verifier in (None, "kd_plugin"):
        fake = _fake_train_v2(monkeypatch, tmp_path / "train_v2.py")
        fake.CallBackVerification = upstream = object()
        config = EasyDict(rec=str(faces), num_classes=8, embedding_size=16, batch_size=6, num_image=0,
                          val_targets=["celeba_val", "absent"], save_all_states=True,
                          output=str(tmp_path / f"out_{verifier}"))
        distill(config, teacher=f"test_tiny:{tmp_path / 'teacher.pth'}", method="ekd", verifier=verifier,
                sampler=dict(identities_per_batch=1, images_per_identity=2))
        caplog.clear()
        with caplog.at_level("WARNING", logger="kd_plugin"):
            fake.get_dataloader(config.rec, 0, 6, seed=2048)
        warned = any("upstream's verification will fail" in r.getMessage() for r in caplog.records)
        if verifier is None:
            assert fake.CallBackVerification is upstream and warned == upstream_verification_fails()
        else:
            assert fake.CallBackVerification is KDPluginVerification and not warned
    callback = fake.CallBackVerification(val_targets=config.val_targets, rec_prefix=config.rec)
    assert [name for name, _ in callback.targets] == ["celeba_val"]  # absent targets skipped, as upstream skips them
    with caplog.at_level("INFO", logger="kd_plugin"):
        callback(10, TinyStudent(16))
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"\[celeba_val\]\[10\]Accuracy-Flip: 0\.\d{5}\+-0\.\d{5}", line) for line in lines)
    assert any(line.startswith("[celeba_val][10]Accuracy-Highest: ") for line in lines)


def test_an_unknown_verifier_is_refused(monkeypatch, tmp_path):
    from kd_plugin.run.config import resolve

    with pytest.raises(KDPluginError, match=r"config.kd.verifier = 'upstream_fixed': allowed: None"):
        resolve(EasyDict(rec="x", num_classes=3, kd=dict(method="ekd", teacher="t.onnx", verifier="upstream_fixed")))
