# ProxylessKD + EKD on MS1MV3: inherited r100 centres, plus EKD's rank loss on the pairs that decide TPR at low FPR.
# Expects work_dirs/ms1mv3_r100/checkpoint_gpu_{0..7}.pt (classifier shards) and work_dirs/ms1mv3_r100/model.pt
# (the teacher backbone; or build a cache once: kd-plugin cache --teacher r100:work_dirs/ms1mv3_r100/model.pt
#  --data /train_tmp/ms1m-retinaface-t1 --out work_dirs/ms1mv3_r100_cache, and set cache= below).
# Each GPU's batch: 96 random samples + 8 identities x 4 images (EKD needs positive pairs in every batch).
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "mbf"
config.embedding_size = 512
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
config.output = "work_dirs/ms1mv3_r100_to_mbf_proxyless_ekd"
config.kd = dict(method="proxyless+ekd", teacher="r100:work_dirs/ms1mv3_r100/model.pt",
                 proxyless=dict(centres="work_dirs/ms1mv3_r100/"), cache=None,
                 sampler=dict(identities_per_batch=8, images_per_identity=4))
