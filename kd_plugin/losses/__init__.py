"""Distillation terms. Each sees the GLOBAL batch (student embeddings gathered with gradient, teacher embeddings and
labels without), holds its hyper-parameters in its constructor and its running state in buffers, and returns
`(loss, {name: scalar})` for logging. `default_weight` is the weight a config gets when it names the term alone."""

from kd_plugin.losses.ekd import EKDLoss
from kd_plugin.losses.embedding import CosineLoss, L2Loss
from kd_plugin.losses.logit import LogitKDLoss
from kd_plugin.losses.relational import CCKDLoss, RKDLoss, SPLoss

TERMS = {"ekd": EKDLoss, "l2": L2Loss, "cosine": CosineLoss, "cckd": CCKDLoss, "sp": SPLoss, "rkd": RKDLoss,
         "logit": LogitKDLoss}

__all__ = ["TERMS", "EKDLoss", "L2Loss", "CosineLoss", "CCKDLoss", "SPLoss", "RKDLoss", "LogitKDLoss"]
