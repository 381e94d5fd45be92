"""kd_plugin: knowledge distillation for insightface's arcface_torch (ProxylessKD, EKD and the baselines)."""

__version__ = "0.1.0"
