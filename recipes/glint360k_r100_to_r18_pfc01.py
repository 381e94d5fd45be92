# Partial-FC large-scale distillation on Glint360K: an r18 student inherits the r100 teacher's 360k CosFace centres,
# stored in fp16-friendly form, and samples 10% of the negative centres per step (sample_rate 0.1).
# Expects the teacher's classifier converted to one file:
#   kd-plugin classifier --from work_dirs/glint360k_r100/ --num-classes 360232 --embedding-size 512 \
#       --out work_dirs/glint360k_r100/centres.pt
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r18"
config.embedding_size = 512
config.sample_rate = 0.1
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.num_workers = 4
config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.output = "work_dirs/glint360k_r100_to_r18_pfc01"
config.kd = dict(method="proxyless", proxyless=dict(centres="work_dirs/glint360k_r100/centres.pt"))
