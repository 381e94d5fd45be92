"""A stand-in for arcface_torch's train_v2.py (insightface 7fadd42) that makes the same calls in the same order with
the same arguments, for kd_plugin's hook contract test in CI where no arcface_torch checkout exists. Written for this
project from reading upstream; not upstream's code. Run it under ../shared/tools/arcface_torch_cpu (strict device
mode): every `.cuda()` there is a no-op that marks tensors, and a module moved to cuda refuses unmarked inputs.

What it mirrors: module-level names get_dataloader / get_model / PartialFC_V2 looked up at call time; the job config
imported inside main(); the loader's `.sampler.set_epoch(epoch)` only for a DataLoader; batches fed to the backbone as
they come; SGD over backbone + classifier parameters; clip 5; checkpoint_gpu_{rank}.pt with upstream's keys at each
epoch end; resume from it. It records, per rank, what the loop saw in <output>/emulated_rank{rank}.jsonl."""
import argparse
import importlib.util
import json
import logging
import os

import torch
from easydict import EasyDict
from torch import distributed, nn
from torch.utils.data import DataLoader

rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
world_size = int(os.environ["WORLD_SIZE"])
distributed.init_process_group("nccl")  # the CPU harness maps it to gloo

BASE = dict(margin_list=(1.0, 0.5, 0.0), network="r50", resume=False, save_all_states=False, output=None,
            embedding_size=512, sample_rate=1.0, interclass_filtering_threshold=0, fp16=False, batch_size=128,
            optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, verbose=2000, frequent=10, dali=False,
            dali_aug=False, gradient_acc=1, seed=2048, num_workers=2, using_wandb=False)


class Backbone(nn.Module):
    def __init__(self, num_features):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, num_features)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))


def get_dataloader(root_dir, local_rank, batch_size, dali=False, dali_aug=False, seed=2048, num_workers=2):
    raise RuntimeError("stand-in: the config's distill() should have replaced get_dataloader")


def get_model(name, dropout=0.0, fp16=False, num_features=512):
    return Backbone(num_features)


def PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16):
    raise RuntimeError("stand-in: the config's distill() should have replaced PartialFC_V2")


def counting():
    """kd_plugin's host-sync spy when the test asks for it (not part of what upstream does)."""
    import contextlib
    if os.environ.get("KD_TEST_COUNT_SYNCS") != "1":
        return contextlib.nullcontext()
    from kd_plugin.host_syncs import count_host_syncs
    return count_host_syncs()


def get_config(path):
    spec = importlib.util.spec_from_file_location("job_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the job config calls kd_plugin.distill here, as under upstream
    cfg = EasyDict(BASE)
    cfg.update(module.config)
    return cfg


def main(args):
    cfg = get_config(args.config)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output, exist_ok=True)
    if rank == 0:  # upstream's init_logging: the root logger writes training.log
        handler = logging.FileHandler(os.path.join(cfg.output, "training.log"))
        handler.setFormatter(logging.Formatter("Training: %(asctime)s-%(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    train_loader = get_dataloader(cfg.rec, local_rank, cfg.batch_size, cfg.dali, cfg.dali_aug, cfg.seed,
                                  cfg.num_workers)
    backbone = get_model(cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size).cuda()
    backbone = nn.parallel.DistributedDataParallel(module=backbone, broadcast_buffers=False,
                                                   device_ids=[local_rank], find_unused_parameters=True)
    backbone.train()
    module_partial_fc = PartialFC_V2(None, cfg.embedding_size, cfg.num_classes, cfg.sample_rate, False)
    module_partial_fc.train().cuda()
    opt = torch.optim.SGD(params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
                          lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    start_epoch, global_step = 0, 0
    checkpoint = os.path.join(cfg.output, f"checkpoint_gpu_{rank}.pt")
    if cfg.resume:
        state = torch.load(checkpoint)
        start_epoch, global_step = state["epoch"], state["global_step"]
        backbone.module.load_state_dict(state["state_dict_backbone"])
        module_partial_fc.load_state_dict(state["state_dict_softmax_fc"])
        opt.load_state_dict(state["state_optimizer"])
    record = open(os.path.join(cfg.output, f"emulated_rank{rank}.jsonl"), "a")
    for epoch in range(start_epoch, cfg.num_epoch):
        if isinstance(train_loader, DataLoader):
            train_loader.sampler.set_epoch(epoch)
        for _, (img, local_labels) in enumerate(train_loader):
            global_step += 1
            local_embeddings = backbone(img)
            with counting() as syncs:  # KD_TEST_COUNT_SYNCS=1: the host syncs of the KD head's forward and backward
                loss = module_partial_fc(local_embeddings, local_labels)
                loss.backward()
            if global_step % cfg.gradient_acc == 0:
                nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                opt.step()
                opt.zero_grad()
            record.write(json.dumps({"epoch": epoch, "step": global_step, "loss": loss.item(),
                                     "image_sum": float(img.sum()), "image_dtype": str(img.dtype),
                                     "label_dtype": str(local_labels.dtype),
                                     "is_dataloader": isinstance(train_loader, DataLoader),
                                     "num_image": cfg.num_image, "steps_per_epoch": len(train_loader),
                                     "host_syncs": None if syncs is None else dict(syncs.by_call)}) + "\n")
        torch.save({"epoch": epoch + 1, "global_step": global_step,
                    "state_dict_backbone": backbone.module.state_dict(),
                    "state_dict_softmax_fc": module_partial_fc.state_dict(), "state_optimizer": opt.state_dict()},
                   checkpoint)
        if rank == 0:
            torch.save(backbone.module.state_dict(), os.path.join(cfg.output, "model.pt"))
    record.close()
    distributed.barrier()
    distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    main(parser.parse_args())
