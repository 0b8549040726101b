"""The two folders of the transfer experiment (docs/results.md, "Does transfer pay?").

    python bench/transfer_folders.py ../shared/data/cifar10-jpg.zip ../transfer

Writes, outside the repository, from the CIFAR-10 JPEG zip:

* ``OUT/source``: the first five classes (airplane, automobile, bird, cat, deer), all their
  training images (25,000) and test images (5,000): what the network is pretrained on;
* ``OUT/target``: the other five (dog, frog, horse, ship, truck), a seeded choice of
  ``--per-class`` training images of each (200: 1,000 in all) and all their test images (5,000):
  the small dataset it is fine-tuned on, against the same images from scratch.

The JPEG bytes are copied as they are (no re-encoding). The two never share a class.
"""

from __future__ import annotations

import argparse
import random
import zipfile
from pathlib import Path

SOURCE = ("airplane", "automobile", "bird", "cat", "deer")
TARGET = ("dog", "frog", "horse", "ship", "truck")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("zip", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with zipfile.ZipFile(args.zip) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        by = {}
        for n in names:
            *_, split, cls, _file = n.split("/")
            by.setdefault((split, cls), []).append(n)
        rng = random.Random(args.seed)
        plan = []
        for cls in SOURCE:
            plan += [("source", "train", cls, n) for n in by[("train", cls)]]
            plan += [("source", "test", cls, n) for n in by[("test", cls)]]
        for cls in TARGET:
            plan += [("target", "train", cls, n) for n in sorted(rng.sample(by[("train", cls)], args.per_class))]
            plan += [("target", "test", cls, n) for n in by[("test", cls)]]
        for part, split, cls, n in plan:
            dest = args.out / part / split / cls / Path(n).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(n))
    counts = {}
    for part, split, _cls, _n in plan:
        counts[(part, split)] = counts.get((part, split), 0) + 1
    print(", ".join(f"{part}/{split}: {n:,}" for (part, split), n in sorted(counts.items())))


if __name__ == "__main__":
    main()
