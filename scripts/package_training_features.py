"""Package the shipped classifier's training patients' features for ``cervscan adapt`` (pooled fits).

    python scripts/package_training_features.py [--visits ../shared/data/visits] [--labels .../labels.csv]
                                                [--cache-dir runs/cache] [--threads 1] [--out weights]

Every image of the training visits goes through the frozen classifier recipe's extraction
(:func:`cervscan.training.classifier.extract`, cached) with the shipped stage model, cervix finder and lesion
segmenter of ``--out`` (weights/), at the recipe's defaults (:class:`cervscan.training.configs.DecisionTrainConfig`:
EfficientNet-Lite0 at 384 px, the whole frame and the segmented lesion region, acetic-acid images, the default
quality gate). Per patient with an eligible image: the mean original-view and segmented-view feature (float16),
the label and the source. Writes ``classifier-training-features.npz`` and its manifest entry (role
``training-features``, sha256, size), so that ``cervscan models verify`` checks it and ``package_weights.py``
keeps it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cervscan.models.registry import TRAINING_FEATURES, sha256_file  # noqa: E402
from cervscan.training import classifier as frozen  # noqa: E402
from cervscan.training.configs import DecisionTrainConfig  # noqa: E402

FILE = "classifier-training-features.npz"


def main(argv=None) -> int:
    data = ROOT.parent / "shared" / "data" / "visits"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--visits", type=Path, default=data)
    ap.add_argument("--labels", type=Path, default=data / "labels.csv")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "weights")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    w = a.out
    cfg = DecisionTrainConfig(visits=str(a.visits), labels=str(a.labels), out=str(w), cache_dir=str(a.cache_dir),
                              seg_model=str(w / "segmenter.pt"), cervix_model=str(w / "cervix.pt"),
                              stage_model=str(w / "stage.pt"))
    meta, pats = frozen.write_training_features(cfg, w / FILE, data="../shared/data/visits (labels.csv)")
    man_path = w / "manifest.json"
    man = json.loads(man_path.read_text(encoding="utf-8"))
    entry = {"role": TRAINING_FEATURES, "file": FILE, "name": "cervscan-classifier-training-features",
             "version": man.get("version"), "sha256": sha256_file(w / FILE), "bytes": (w / FILE).stat().st_size,
             "dtype": "float16", "training_data": meta["data"], "patients": meta["patients"],
             "severe": int(pats.y.sum()), "sources": {s: int((pats.source == s).sum()) for s in sorted(set(pats.source))},
             "recipe": meta["recipe"], "models": meta["models"],
             "use": "cervscan adapt: pooled with a site's patients (local + shipped training patients)"}
    man["models"] = [e for e in man["models"] if e.get("role") != TRAINING_FEATURES] + [entry]
    man_path.write_text(json.dumps(man, indent=2) + "\n", encoding="utf-8")
    print(f"{w / FILE}: {meta['patients']} patients ({entry['severe']} severe), {entry['bytes'] / 1e6:.2f} MB, "
          f"sha256 {entry['sha256'][:12]}; {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
