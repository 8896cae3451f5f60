"""How long does loading full Fashion-MNIST (60,000 training images) take?

    python bench/bench_data.py [--root PATH] [--repeats 5]

Times, as medians of --repeats runs: reading + gunzipping the training
images and labels (read_idx), converting the 60,000 uint8 images to
normalised float32, and the whole ``load_dataset`` (train and test).
--root is a folder holding the four files, or its parent (the shared
``data`` folder); default: $DPCNN_SHARED_DATA, else ../shared/data.
Writes bench/data.json next to this script.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from dpcnn.data import DATASETS, _to_float, load_dataset  # noqa: E402
from dpcnn.idx import ensure_files, read_idx  # noqa: E402


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    default_root = os.environ.get("DPCNN_SHARED_DATA") or HERE.parents[1] / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(default_root))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    spec = DATASETS["fashion_mnist"]
    paths = ensure_files(spec, args.root, download=False)
    t_gunzip, (images, labels) = median_time(
        lambda: (read_idx(paths["train_images"]), read_idx(paths["train_labels"])), args.repeats)
    t_convert, x = median_time(
        lambda: (_to_float(images[..., None], spec.mean, spec.std, True), labels.astype(np.int64)), args.repeats)
    t_load, splits = median_time(lambda: load_dataset(spec, args.root, download=False), args.repeats)

    result = {
        "dataset": spec.name,
        "files": {k: str(p) for k, p in paths.items()},
        "train_shape": list(x[0].shape),
        "repeats": args.repeats,
        "train_gunzip_s": round(t_gunzip, 4),
        "train_convert_s": round(t_convert, 4),
        "train_total_s": round(t_gunzip + t_convert, 4),
        "load_dataset_train_and_test_s": round(t_load, 4),
        "images_per_s": round(len(labels) / (t_gunzip + t_convert)),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    assert splits.train[0].shape == x[0].shape
    print(f"Fashion-MNIST train {tuple(x[0].shape)} from gzip to normalised float32 "
          f"(median of {args.repeats}):")
    print(f"  gunzip + parse  {t_gunzip * 1e3:7.1f} ms")
    print(f"  to float32      {t_convert * 1e3:7.1f} ms")
    print(f"  total           {(t_gunzip + t_convert) * 1e3:7.1f} ms  ({result['images_per_s']:,} images/s)")
    print(f"  load_dataset (train + test, all checks): {t_load * 1e3:.1f} ms")
    (HERE / "data.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {HERE / 'data.json'}")


if __name__ == "__main__":
    main()
