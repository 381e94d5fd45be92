"""kd_plugin: knowledge distillation for insightface's arcface_torch (ProxylessKD, EKD and the baselines)."""

from kd_plugin.methods.registry import add_term, register_term

__version__ = "0.5.1"
__all__ = ["distill", "register_term", "add_term", "__version__"]


def distill(config, teacher=None, method="proxyless", **kd):
    """One line in an arcface_torch config: `from kd_plugin import distill; distill(config, teacher=..., method=...)`."""
    from kd_plugin.run.hook import distill as _distill
    return _distill(config, teacher, method, **kd)
