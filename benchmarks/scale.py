"""What a COCO annotation file's size costs the driver and each actor (2 CPU cores, no images needed).

    python benchmarks/scale.py [--sizes 10000,40000,120000] [--workdir bench-scale]

For each size, a COCO-style instances file like COCO 2014's (~7.5 polygon instances per image, 80
categories) is generated, then:
- the driver's parse (``COCODataset``) and the index it writes (``open_indexed``: seconds, Parquet size);
- an actor as the labeling job starts it (``label.actors.Loader`` on the reader payload; its rows
  bring their records): start-up seconds and resident memory after one block of 64 rows;
- beside it, an actor that opens the dataset itself, as every actor did before the index.
Target: the job's actor RSS within 10% from the smallest to the largest size.

With ``--s3``, on a moto S3 server on loopback (its access log counts the requests): what a labeling
job's writes cost per image (the Labeler's own encoders and ``write_part``, batches of 16, no CAM
cache), and the resume scan (``outputs.read_parts``) over the manifest parts of 10,000 done images.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

from wsss_platform.datasets import COCODataset, DatasetConfig, keep_index, open_indexed


def write_instances(path: str, images: int, seed: int = 0) -> int:
    """A COCO instances file of ``images`` images; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i + 1 + i // 9, "name": f"class{i}", "supercategory": "thing"} for i in range(80)]
    ims, anns, aid = [], [], 1
    for n in range(1, images + 1):
        w, h = int(rng.integers(320, 640)), int(rng.integers(320, 640))
        ims.append({"id": n, "file_name": f"{n:012d}.jpg", "width": w, "height": h})
        for _ in range(int(rng.poisson(7.5))):
            x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            r = rng.uniform(8, 40)
            poly = np.stack([x + r + r * np.cos(t), y + r + r * np.sin(t)], 1).round(2).reshape(-1).tolist()
            anns.append({"id": aid, "image_id": n, "category_id": cats[int(rng.integers(80))]["id"], "iscrowd": 0,
                         "area": float(np.pi * r * r), "bbox": [x, y, 2 * r, 2 * r], "segmentation": [poly]})
            aid += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"images": ims, "annotations": anns, "categories": cats}, f)
    return os.path.getsize(path)


def probe_class():
    import ray

    @ray.remote(num_cpus=0.5)
    class Probe:
        """One actor: built as the job builds its loaders (``reader``) or opening the dataset (``dataset``)."""

        def __init__(self, kind: str, arg: dict) -> None:
            import psutil

            from wsss_platform.datasets import open_dataset
            from wsss_platform.label.actors import Loader

            t0 = time.perf_counter()
            self.loader = Loader(arg) if kind == "reader" else None
            self.ds = open_dataset(DatasetConfig.model_validate(arg)) if kind == "dataset" else None
            self.start, self.proc = time.perf_counter() - t0, psutil.Process()

        def run(self, batch: dict) -> tuple[float, float]:
            if self.loader is not None:  # no image files: each row ends as its error, after its record is read
                self.loader(batch)
            else:
                for i in batch["image_id"]:
                    self.ds.record(str(i))
            return self.start, self.proc.memory_info().rss / 2**20

    return Probe


def measure(workdir: str, images: int) -> dict[str, float]:
    import ray

    root = os.path.join(workdir, f"coco-{images}")
    size = write_instances(os.path.join(root, "annotations", "instances_train.json"), images)
    cfg = DatasetConfig(uri=root, layout="coco", max_image_pixels=None)
    t0 = time.perf_counter()
    COCODataset(root, "train")
    parse = time.perf_counter() - t0
    shutil.rmtree(os.path.join(workdir, "index"), ignore_errors=True)
    t0 = time.perf_counter()
    ds, uri = open_indexed(cfg, os.path.join(workdir, "index"))
    keep_index(ds, uri)  # as the jobs do: the index is written once the parse is known to be wanted
    index = time.perf_counter() - t0
    ids = ds.ids[:64]
    batch = {"image_id": np.array(ids, dtype=object), "record": np.array(ds.records(ids), dtype=object)}
    probe = probe_class()
    row = {"images": images, "json_mb": size / 2**20, "parse_s": parse, "index_s": index,
           "index_mb": os.path.getsize(uri) / 2**20}
    for kind, arg in (("reader", ds.reader_payload()), ("dataset", cfg.model_dump(mode="json"))):
        actor = probe.remote(kind, arg)
        row[f"{kind}_start_s"], row[f"{kind}_rss_mb"] = ray.get(actor.run.remote(batch))
        ray.kill(actor)
    shutil.rmtree(root, ignore_errors=True)
    return row


def s3_costs(images: int = 1000, done: int = 10_000, batch: int = 16) -> dict[str, float]:
    """Writes of ``images`` labelled images and the resume scan at ``done`` images, on a moto server."""
    import re
    import socket
    import subprocess
    import tempfile

    from wsss_platform import outputs, storage
    from wsss_platform.datasets.base import encode_mask_png

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115 - the server writes it until the end
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=log)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        time.sleep(3)
        import s3fs

        s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}").mkdir("bench")
        rng = np.random.default_rng(0)
        mask = (rng.random((320, 320)) * 4).astype(np.uint8)
        conf = rng.random((320, 320)).astype(np.float32)
        out = "s3://bench/labels"
        puts0 = _puts(log.name, re)
        t0 = time.perf_counter()
        for start in range(0, images, batch):
            rows = []
            for n in range(start, min(images, start + batch)):
                i = f"{n:012d}"
                storage.write_bytes(outputs.pseudo_uri(out, i), encode_mask_png(mask))
                storage.write_bytes(outputs.confidence_uri(out, i), outputs.encode_confidence_png(conf))
                storage.write_bytes(outputs.mask_uri(out, i), encode_mask_png(mask))
                rows.append({"image_id": i, "status": "done", "finished_at": time.time()})
            outputs.write_part(out, rows)
        writes = time.perf_counter() - t0
        puts = _puts(log.name, re) - puts0
        scan_out = "s3://bench/resume"
        for start in range(0, done, batch):
            outputs.write_part(scan_out, [{"image_id": f"{n:012d}", "status": "done", "finished_at": time.time()}
                                          for n in range(start, min(done, start + batch))])
        t0 = time.perf_counter()
        rows_found = outputs.read_parts(scan_out).num_rows
        scan = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(10)
    return {"images": images, "puts_per_image": puts / images, "write_s_per_1000": writes / images * 1000,
            "done": rows_found, "parts": -(-done // batch), "scan_s": scan}


def _puts(path: str, re) -> int:
    with open(path, errors="replace") as f:
        return len(re.findall(r'"(?:\x1b\[[0-9;]*m)*PUT ', f.read()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,40000,120000")
    p.add_argument("--workdir", default="bench-scale")
    p.add_argument("--s3", action="store_true", help="also the labeling outputs' cost on a moto S3 server")
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = [measure(args.workdir, int(n)) for n in args.sizes.split(",")]
    ray.shutdown()
    print(f"\nCOCO-style instances files (~7.5 polygon instances per image); {platform.machine()} CPU, 2 cores\n")
    print("| images | JSON MB | driver parse s | index written s | index MB | job's actor: start s | RSS MB "
          "| actor opening the JSON: start s | RSS MB |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['json_mb']:.0f} | {r['parse_s']:.1f} | {r['index_s']:.1f} | {r['index_mb']:.1f} "
              f"| {r['reader_start_s']:.3f} | {r['reader_rss_mb']:.0f} | {r['dataset_start_s']:.1f} "
              f"| {r['dataset_rss_mb']:.0f} |")
    growth = rows[-1]["reader_rss_mb"] / rows[0]["reader_rss_mb"] - 1
    print(f"\njob's actor RSS from {rows[0]['images']:,} to {rows[-1]['images']:,} images: {growth:+.1%} "
          f"(target within ±10%)")
    if args.s3:
        c = s3_costs()
        print("\nLabeling outputs on a moto S3 server on loopback (batches of 16; pseudo, confidence and mask PNGs of "
              "320x320, one manifest part a batch)\n")
        print("| PUTs per image | writes: s per 1,000 images | resume scan: done images | parts | s |\n|---|---|---|---|---|")
        print(f"| {c['puts_per_image']:.2f} | {c['write_s_per_1000']:.1f} | {c['done']:,} | {c['parts']} | "
              f"{c['scan_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
