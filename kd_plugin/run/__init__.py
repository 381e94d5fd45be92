"""Running a distillation: the config and its checks (config.py), the objects a run is built from (build.py), the
KD step both ways in take (kd_step.py), the trainer of `kd-plugin train` (train.py) and the one-line hook for
arcface_torch's train_v2.py (hook.py)."""
