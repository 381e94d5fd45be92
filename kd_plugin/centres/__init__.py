"""The class centres a head inherits when the teacher comes without a classifier: estimated (`estimate.py`: the class
means of the teacher's embeddings, online or from its cache), fitted (`fit.py`: a margin-softmax classifier trained
over the cached embeddings) and, for a run, derived from its teacher and saved per rank for resume (`derived.py`).
The teacher's own classifier shards are read in kd_plugin.teachers.classifier (the head reads its class range there);
which `kd.<head>.centres` values derive them is ProxylessKD's (kd_plugin.methods.heads.DERIVED_CENTRES)."""
