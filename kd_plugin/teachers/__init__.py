"""Teachers and other embedding models: anything with `embed(uint8 batch) -> float embeddings`; their classifiers,
estimated class centres and cached embeddings."""

from kd_plugin.teachers.cache import TeacherCache, build_cache, load_cache
from kd_plugin.teachers.centres import estimate_centres
from kd_plugin.teachers.classifier import read_classifier, save_classifier
from kd_plugin.teachers.spec import build_network, load_embedder, parse_model_spec

__all__ = ["TeacherCache", "build_cache", "load_cache", "estimate_centres", "read_classifier",
           "save_classifier", "build_network", "load_embedder", "parse_model_spec"]
