# WebFace42M scale (2,059,906 identities): an r50 student with the r100 teacher's inherited centres, sample_rate 0.2,
# on 32 GPUs (torchrun --nnodes=4 --nproc_per_node=8). Each GPU holds ~64k frozen centres: 64k x 512 x 2 bytes (fp16)
# instead of parameters + gradients + momentum. A teacher released without classifier gets estimated centres:
#   torchrun --nproc_per_node=8 -m kd_plugin centres --teacher r100:work_dirs/wf42m_r100/model.pt \
#       --data /train_tmp/WebFace42M --out work_dirs/wf42m_r100/centres.pt
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r50"
config.embedding_size = 512
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.4
config.verbose = 10000
config.num_workers = 2
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
config.output = "work_dirs/wf42m_r100_to_r50_proxyless_pfc02"
config.kd = dict(method="proxyless", proxyless=dict(centres="work_dirs/wf42m_r100/centres.pt"))
