"""Distillation terms. Each sees the GLOBAL batch (student embeddings gathered with gradient, teacher embeddings and
labels without), holds its hyper-parameters in its constructor and its running state in buffers, and returns
`(loss, {name: scalar})` for logging. Each is declared to the method registry next to its class (name, default weight,
needs); its constructor's keyword defaults are its config block."""

from kd_plugin.methods.losses.ekd import EKDLoss
from kd_plugin.methods.losses.embedding import CosineLoss, L2Loss
from kd_plugin.methods.losses.logit import LogitKDLoss
from kd_plugin.methods.losses.relational import CCKDLoss, RKDLoss, SPLoss

__all__ = ["EKDLoss", "L2Loss", "CosineLoss", "CCKDLoss", "SPLoss", "RKDLoss", "LogitKDLoss"]
