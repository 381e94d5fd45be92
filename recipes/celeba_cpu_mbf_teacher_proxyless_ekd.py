# CPU recipe on the shared real faces: the MobileFaceNet ONNX teacher (128-d, ImageNet normalisation) distils an r18
# student with 128-d embeddings by ProxylessKD + EKD, centres estimated from the teacher's cached embeddings.
# Expects ../shared/data (run from the repository root) and a cache built once:
#   kd-plugin cache --teacher ../shared/data/teachers/mobilefacenet_ms1m/mobilefacenet_dynamic.onnx \
#       --mean 123.675,116.28,103.53 --std 58.395,57.12,57.375 --data ../shared/data/celeba/train.rec \
#       --out work_dirs/celeba_mfn_cache
# The real-face benchmark (issue "Proof on real faces") will tune the CPU budget; this is the job it starts from.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r18"
config.embedding_size = 128
config.batch_size = 64
config.lr = 0.1
config.verbose = 200
config.frequent = 10
config.num_workers = 1
config.rec = "../shared/data/celeba/train.rec"
config.num_classes = 249
config.num_image = 5206
config.num_epoch = 10
config.warmup_epoch = 1
config.val_targets = ["../shared/data/celeba/celeba_val.bin"]
config.output = "work_dirs/celeba_mfn_to_r18_proxyless_ekd"
config.kd = dict(method="proxyless+ekd",
                 teacher="../shared/data/teachers/mobilefacenet_ms1m/mobilefacenet_dynamic.onnx",
                 teacher_mean="123.675,116.28,103.53", teacher_std="58.395,57.12,57.375",
                 cache="work_dirs/celeba_mfn_cache", proxyless=dict(centres="estimate"),
                 sampler=dict(identities_per_batch=8, images_per_identity=4))
