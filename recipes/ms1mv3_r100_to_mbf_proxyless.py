# ProxylessKD on MS1MV3: a MobileFaceNet student inherits a trained r100 teacher's classifier (frozen) and trains with
# ArcFace against it. Expects the teacher's run folder work_dirs/ms1mv3_r100/ holding checkpoint_gpu_{0..7}.pt
# (arcface_torch with save_all_states=True); no teacher forward pass is needed during training.
# Run: torchrun --nproc_per_node=8 -m kd_plugin train recipes/ms1mv3_r100_to_mbf_proxyless.py
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.embedding_size = 512  # must equal the teacher's
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.num_workers = 2
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 40
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.output = "work_dirs/ms1mv3_r100_to_mbf_proxyless"
config.kd = dict(method="proxyless", proxyless=dict(centres="work_dirs/ms1mv3_r100/"))
