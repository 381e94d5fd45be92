"""Teachers and other embedding models (Embedders, kd_plugin.teachers.formats): their formats, classifier shards and
cached embeddings. The networks students and torch teachers are built from are in kd_plugin.networks; centres
estimated or fitted from a teacher in kd_plugin.centres."""

from kd_plugin.teachers.cache import TeacherCache, build_cache, load_cache
from kd_plugin.teachers.classifier import read_classifier, save_classifier
from kd_plugin.teachers.spec import load_embedder, parse_model_spec

__all__ = ["TeacherCache", "build_cache", "load_cache", "read_classifier",
           "save_classifier", "load_embedder", "parse_model_spec"]
