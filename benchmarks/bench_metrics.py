"""Speed of `p3m_jax.evaluation.metrics.matting_metrics` against a NumPy/SciPy/scikit-image version of the same metrics.

The NumPy version below is written from docs/design.md section 6 (one image at a time, as the authors' evaluation
loops). The authors' Conn additionally runs a Euclidean distance transform per threshold whose result it never
uses; `--authors_edt` adds that step so the NumPy column has the authors' cost profile.

    python benchmarks/bench_metrics.py [--size 1080 1440] [--repeats 3] [--batch 4] [--authors_edt]
        [--sample_dir DIR]

The ground-truth matte is the first mask of --sample_dir (a P3M-500-P folder of the release) resized to
--size, or a synthetic matte without one. Prints the median seconds per image of each implementation and the ratio
NumPy / JAX.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax
import numpy as np
from scipy import ndimage

from p3m_jax.common import cli
from p3m_jax.evaluation.metrics import matting_metrics


def numpy_metrics(pred, gt, trimap, authors_edt=False):
    """All metrics of docs/design.md section 6 for one (H, W) float32 pair, NumPy/SciPy/scikit-image."""
    from skimage.measure import label

    out = {}
    diff = pred - gt
    n = pred.size
    out["SAD"] = np.abs(diff).sum() / 1000
    out["MSE"] = (diff**2).sum() / n
    out["MAD"] = np.abs(diff).sum() / n
    forced = np.where(trimap == 255, 1.0, np.where(trimap == 0, 0.0, pred))
    unknown = max(float((trimap == 128).sum()), 1.0)
    out["SAD_T"] = np.abs(forced - gt).sum() / 1000
    out["MSE_T"] = ((forced - gt) ** 2).sum() / unknown
    out["MAD_T"] = np.abs(forced - gt).sum() / unknown
    out["SAD_FG"] = np.abs(diff)[trimap == 255].sum() / 1000
    out["SAD_BG"] = np.abs(diff)[trimap == 0].sum() / 1000

    def magnitude(x):
        gx = ndimage.gaussian_filter(x, 1.4, order=[1, 0], output=np.float32)
        gy = ndimage.gaussian_filter(x, 1.4, order=[0, 1], output=np.float32)
        return np.sqrt(gx**2 + gy**2)

    out["GRAD"] = ((magnitude(pred) - magnitude(gt)) ** 2).sum() / 10

    level = np.full(pred.shape, -1.0, np.float32)
    steps = np.arange(0, 1.1, 0.1)
    for i in range(1, len(steps)):
        labels = label((pred >= steps[i]) & (gt >= steps[i]), connectivity=1)
        if labels.max() == 0:
            continue
        component = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        level[(level == -1) & ~component] = steps[i - 1]
        if authors_edt:
            ndimage.distance_transform_edt(~component)
    level[level == -1] = 1
    phi = lambda x: 1 - (x - level) * ((x - level) >= 0.15)
    out["CONN"] = np.abs(phi(pred) - phi(gt)).sum() / 1000
    return out


def make_pair(height, width, seed=0, sample_dir=None):
    """A real matte from `sample_dir` (resized) or a synthetic one, and a noisy 8-bit prediction of it.

    Returns `(pred, gt, trimap, source)`, source naming the matte used.
    """
    import cv2

    rng = np.random.default_rng(seed)
    sample_dir = pathlib.Path(sample_dir) if sample_dir else None
    masks = sorted((sample_dir / "mask").glob("*.png")) if sample_dir and sample_dir.exists() else []
    source = str(masks[0]) if masks else "synthetic (no sample found)"
    if masks:
        gt8 = cv2.resize(cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE), (width, height))
    else:
        field = ndimage.gaussian_filter(rng.normal(size=(height, width)), 40)
        gt8 = np.clip((field - field.mean()) / field.std() * 200 + 128, 0, 255).astype(np.uint8)
    noise = rng.normal(0, 20, gt8.shape) + 30 * ndimage.gaussian_filter(rng.normal(size=gt8.shape), 20)
    pred8 = np.clip(gt8 + noise, 0, 255).astype(np.uint8)
    trimap = np.where(gt8 == 255, 255, np.where(gt8 == 0, 0, 128)).astype(np.uint8)
    trimap = np.where(ndimage.binary_dilation(trimap == 128, iterations=10), 128, trimap).astype(np.uint8)
    return pred8.astype(np.float32) / 255, gt8.astype(np.float32) / 255, trimap, source


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = cli.ArgumentParser("python benchmarks/bench_metrics.py", __doc__)
    parser.add_argument("--size", type=int, nargs=2, default=(1080, 1440), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="batch size of the batched JAX row")
    parser.add_argument("--authors_edt", action="store_true", help="add the authors' unused distance transform")
    parser.add_argument(
        "--sample_dir",
        type=pathlib.Path,
        default=None,
        help="P3M-500-P folder whose first mask/*.png is the ground truth (default: a synthetic matte)",
    )
    args = parser.parse_args()
    height, width = args.size
    pred, gt, trimap, source = make_pair(height, width, sample_dir=args.sample_dir)

    def jax_single():
        jax.block_until_ready(matting_metrics(pred, gt, trimap))

    batch = [np.stack([x] * args.batch) for x in (pred, gt, trimap)]

    def jax_batch():
        jax.block_until_ready(matting_metrics(*batch))

    start = time.perf_counter()
    jax_single()
    first_call = time.perf_counter() - start
    jax_batch()
    reference = numpy_metrics(pred, gt, trimap, args.authors_edt)
    ours = {k: float(v) for k, v in matting_metrics(pred, gt, trimap).items()}
    worst = max(abs(ours[k] - reference[k]) / max(abs(reference[k]), 1e-12) for k in reference)

    t_numpy = median_time(lambda: numpy_metrics(pred, gt, trimap, args.authors_edt), args.repeats)
    t_single = median_time(jax_single, args.repeats)
    t_batch = median_time(jax_batch, args.repeats) / args.batch

    print(
        f"matting metrics, one {height}x{width} image, {jax.devices()[0].platform} "
        f"({jax.device_count()} device), median of {args.repeats}"
    )
    print(f"ground truth: {source}")
    print(f"max relative difference JAX vs NumPy over all metrics: {worst:.2e}")
    print(f"JAX first call (compile + run): {first_call:.2f} s")
    print("| implementation | s / image | NumPy / this |")
    print("| --- | --- | --- |")
    label = "NumPy/SciPy/scikit-image" + (" + authors' unused EDT" if args.authors_edt else "")
    print(f"| {label} | {t_numpy:.3f} | 1.00 |")
    print(f"| JAX matting_metrics, batch 1 | {t_single:.3f} | {t_numpy / t_single:.2f} |")
    print(f"| JAX matting_metrics, batch {args.batch} | {t_batch:.3f} | {t_numpy / t_batch:.2f} |")


if __name__ == "__main__":
    main()
