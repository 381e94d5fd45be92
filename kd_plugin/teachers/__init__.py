"""Teachers and other embedding models (Embedders, kd_plugin.teachers.formats): their formats, classifier shards and
cached embeddings. Centres estimated or fitted from a teacher are in kd_plugin.centres."""

from kd_plugin.teachers.cache import TeacherCache, build_cache, load_cache
from kd_plugin.teachers.classifier import read_classifier, save_classifier
from kd_plugin.teachers.spec import build_network, load_embedder, parse_model_spec

__all__ = ["TeacherCache", "build_cache", "load_cache", "read_classifier",
           "save_classifier", "build_network", "load_embedder", "parse_model_spec"]
