"""Driver for the multi-node test (run in its own process: it starts its own Ray cluster).

Two Ray nodes on loopback (``ray.cluster_utils.Cluster``), 2 CPU workers (gloo) placed on different
nodes (STRICT_SPREAD), the platform's own model / optimiser / DDP (``loop.build``), SGD step
(``loop.step``) and Ray Data crops (``data.train_dataset``). After every step each worker's full
parameter vector is gathered and compared; rank 0 writes what it saw to the JSON file argv[2].
Usage: python two_node_train.py <demo VOC dataset> <result.json>
"""

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def per_worker(config):
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from wsss_platform.train import loop
    from wsss_platform.train.config import TrainConfig

    cfg = TrainConfig.model_validate(config["cfg"])
    torch.manual_seed(cfg.train.seed)
    model, optimizer, scheduler = loop.build(cfg, config["num_classes"], None)
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    losses, diffs = [], []
    shard = ray.train.get_dataset_shard("train")
    while len(losses) < cfg.train.iterations:
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True):
            losses.append(loop.step(model, optimizer, scheduler, batch, cfg.train.mu, None, torch.device("cpu")))
            flat = torch.cat([p.detach().flatten() for p in loop.unwrap(model).parameters()])
            every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(every, flat)
            diffs.append(max(float((w - every[0]).abs().max()) for w in every))
            if len(losses) == cfg.train.iterations:
                break
    if dist.get_rank() == 0:
        with open(config["result"], "w") as f:
            json.dump({"nodes": nodes, "losses": losses, "max_param_diff": diffs,
                       "backend": dist.get_backend()}, f)
    ray.train.report({"done": 1})


def main(dataset: str, result: str) -> None:
    import ray
    import ray.train
    from ray.cluster_utils import Cluster
    from ray.train.torch import TorchTrainer

    from wsss_platform.config import build_config
    from wsss_platform.datasets import open_dataset
    from wsss_platform.train import data
    from wsss_platform.train.config import TrainConfig

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = build_config(TrainConfig, {}, [
            f"dataset.uri={dataset}", "train.pseudo_masks=none", "model.backbone=open_clip:tiny", "model.pretrained=none",
            "model.head=largefov", "train.batch_size=4", "train.crop_size=48", "train.iterations=16", "train.lr=0.005",
            "train.scale_range=[1.0,1.0]", "compute.num_workers=2"])
        ds = open_dataset(cfg.dataset)
        trainer = TorchTrainer(
            per_worker, datasets={"train": data.train_dataset(cfg, list(ds.ids), cfg.dataset.worker_payload())},
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "num_classes": 1 + len(ds.classes.names),
                               "result": result},
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                                   placement_strategy="STRICT_SPREAD"),
            run_config=ray.train.RunConfig(storage_path=os.path.dirname(result), name="two-nodes"))
        trainer.fit()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
