"""The false-positive rates face verification is judged at (IJB-B/C report TPR at FAR 1e-6 ... 1e-1): the evaluation's
default figures and, by the same token, EKD's thresholds."""

DEFAULT_FPRS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
