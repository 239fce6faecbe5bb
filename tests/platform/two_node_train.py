"""Driver for the multi-node test (run in its own process: it starts its own Ray cluster).

Two Ray nodes on loopback (``ray.cluster_utils.Cluster``), 2 CPU workers (gloo) placed on different
nodes (STRICT_SPREAD), the recipe's own module / optimiser / DDP (``loop.build``), step
(``loop.step``) and Ray Data samples (``recipe.dataset``). After every step each worker's full
parameter vector is gathered and compared; rank 0 writes what it saw to ``<out>/<recipe>.json``.
Usage: python two_node_train.py <demo VOC dataset> <out folder> <recipe>... (recipes: segmenter,
segmenter-frozen, toco, affinity; segmenter-frozen: the head on the frozen backbone's features,
computed first on the cluster), all on one cluster.
"""

import copy
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
    from wsss_platform.train.recipes import recipe_class

    cls = recipe_class(config["recipe"])
    recipe = cls(cls.config.model_validate(config["cfg"]))
    cfg = recipe.cfg
    torch.manual_seed(cfg.train.seed)
    model, optimizer, scheduler = loop.build(recipe, config["class_names"], None)
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    initial = copy.deepcopy(loop.unwrap(model).state_dict())
    losses, diffs, epochs = [], [], []
    shard = ray.train.get_dataset_shard("train")
    while len(losses) < cfg.train.iterations:
        epochs.append([])
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True):
            epochs[-1].append(batch)
            terms = loop.step(recipe, model, optimizer, scheduler, batch, None, torch.device("cpu"))
            # ToCo: the classification term (its contrast terms need not fall within 16 steps of a random model)
            losses.append(terms.get("loss/cls", terms["loss"]))
            flat = torch.cat([p.detach().flatten() for p in loop.unwrap(model).parameters()])
            every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(every, flat)
            diffs.append(max(float((w - every[0]).abs().max()) for w in every))
            if len(losses) == cfg.train.iterations:
                break
    # the first epoch's batches again, with the trained parameters and then the initial ones: one batch's
    # loss, or the step losses (each on another batch), swing too much between runs to show learning
    after = _mean_loss(recipe, model, epochs[0], len(losses))
    loop.unwrap(model).load_state_dict(initial)
    before = _mean_loss(recipe, model, epochs[0], len(losses))
    if dist.get_rank() == 0:
        with open(config["result"], "w") as f:
            json.dump({"nodes": nodes, "losses": losses, "max_param_diff": diffs, "backend": dist.get_backend(),
                       "epoch_one_before": before, "epoch_one_after": after}, f)
    ray.train.report({"done": 1})


def _mean_loss(recipe, model, batches, iteration: int) -> float:
    """The mean loss (ToCo: its classification term) over ``batches``, each with the same random draws."""
    import torch

    terms = []
    with torch.no_grad():
        for batch in batches:
            torch.manual_seed(0)  # dropout and ToCo's crops drawn alike with either set of parameters
            t = recipe.losses(model, batch, iteration, torch.device("cpu"))
            terms.append(float(t.get("loss/cls", t["loss"])))
    return sum(terms) / len(terms)


SETTINGS = {
    "segmenter": ["train.pseudo_masks=none", "model.head=largefov", "train.batch_size=4", "train.crop_size=48",
                  "train.lr=0.005"],
    "segmenter-frozen": ["train.pseudo_masks=none", "model.head=conv", "model.freeze_backbone=true",
                         "train.batch_size=4", "train.crop_size=48", "train.lr=0.001", "train.optimizer=adamw",
                         "train.head_lr_mult=1"],  # as jobs/configs/synthshapes-train-frozen.yaml: 10x spikes AdamW
    # seg_from 0: every term (PTC, CTC, the head's loss and its CRF energy) takes part from the first step;
    # 16 images: at batch 2 the first batch comes back every 4 steps (once in 16 steps of 64 images, too
    # few for a random model's classification loss on it to fall by a fifth)
    "toco": ["dataset.limit=16", "train.batch_size=2", "train.crop_size=64", "train.local_crop_size=32", "train.local_crops=2",
             "train.lr=0.001", "train.warmup_iterations=0", "train.seg_from=0", "train.cam_scales=[1.0]",
             "model.proj_dim=64"],
    "affinity": ["train.batch_size=4", "train.crop_size=64", "train.optimizer=adamw", "train.lr=0.0003",
                 "train.radius=3", "model.dims=[8, 8, 16]"],
}


def train_on(cluster_dataset: str, out: str, recipe: str) -> None:
    """One recipe's 16 steps on the running 2-node cluster; rank 0 writes ``<out>/<recipe>.json``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from wsss_platform.config import build_config
    from wsss_platform.datasets import open_dataset
    from wsss_platform.train.recipes import recipe_class

    cls, settings = recipe_class(recipe.split("-")[0]), SETTINGS[recipe]
    if recipe == "affinity":  # the CAMs it learns from: the split labeled on this cluster first
        from wsss_platform.label.config import LabelConfig
        from wsss_platform.label.job import run_label

        cams = os.path.join(out, "cams")
        run_label(build_config(LabelConfig, {}, [f"dataset.uri={cluster_dataset}", f"output={cams}", "model.name=tiny",
                                                 "model.pretrained=none", "refine=[]", "tracking.enabled=false"]))
        settings = [*settings, f"train.cams={cams}"]
    cfg = build_config(cls.config, {}, [
        f"dataset.uri={cluster_dataset}", "model.backbone=open_clip:tiny", "model.pretrained=none",
        "train.iterations=16", "train.scale_range=[1.0,1.0]", "compute.num_workers=2",
        f"output={os.path.join(out, recipe)}", *settings])
    ds = open_dataset(cfg.dataset)
    r, ids = cls(cfg), list(ds.ids)
    names = ["background", *ds.classes.names]
    r.prepare(ds, ids, names, False, print)  # a frozen backbone's features, computed on the cluster first
    trainer = TorchTrainer(
        per_worker, datasets={"train": r.dataset(ds, ids)},
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "class_names": names,
                           "result": os.path.join(out, f"{recipe}.json"), "recipe": cls.name},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                               placement_strategy="STRICT_SPREAD"),
        run_config=ray.train.RunConfig(storage_path=out, name=f"two-nodes-{recipe}"))
    trainer.fit()


def main(dataset: str, out: str, recipes: list[str]) -> None:
    """One 2-node cluster (its start-up is most of a recipe's time), each recipe trained on it in turn."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        for recipe in recipes:
            train_on(dataset, out, recipe)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
