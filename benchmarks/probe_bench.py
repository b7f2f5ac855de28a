"""Probing speed on CPU: one layer of the default model for one task, and the vectorised latent tests.

1. ``qsae probe`` work for one (precision, layer, task): build the task, one forward pass over its
   windows (stopped after the layer), the probe with its control task (2 x cv logistic fits).
   Target: under a minute on the 2-core CPU. Printed as a ratio against that minute.
2. :func:`qsae_lens.probing.latent_tests` (scipy, ``axis=0``, column blocks) against scipy called
   once per latent in a Python loop, on the same codes: the reference measured in the same run.

    nice python benchmarks/probe_bench.py --task py_token_class --layer 16 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="py_token_class")
    ap.add_argument("--layer", type=int, default=16)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latents", type=int, default=4096, help="latents in the latent-test comparison")
    ap.add_argument("--rows", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qsae_lens.assets import default_model_path
    from qsae_lens.models import load_model
    from qsae_lens.probing import build_task, latent_tests, train_probe
    from qsae_lens.probing.api import task_features

    t0 = time.perf_counter()
    model = load_model(default_model_path(), args.precision, "cpu")
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    task = build_task(args.task, model.tokenizer)
    t_task = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = task_features(model, [task], [args.layer], progress=False)[(task.name, args.layer)]
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = train_probe(x, task.labels, types=task.types, groups=task.groups)
    t_probe = time.perf_counter() - t0
    total = t_task + t_fwd + t_probe
    n_tokens = sum(len(w) for w in task.windows)
    print(f"[1] {task!r}")
    print(f"    {r!r}")
    print(f"    model load {t_load:.1f} s (not counted); task {t_task:.1f} s; forward {t_fwd:.1f} s "
          f"({n_tokens} tokens, {n_tokens / t_fwd:.0f} tok/s); probe + control {t_probe:.1f} s")
    print(f"    one layer, one task: {total:.1f} s = {total / 60:.2f} x the 60 s target")

    from scipy import stats

    rng = np.random.default_rng(0)
    y = (rng.random(args.rows) < 0.5).astype(np.int64)
    codes = np.maximum(rng.normal(size=(args.rows, args.latents)) - 1.0, 0.0)
    for test, fn in (("welch", lambda a, b: stats.ttest_ind(a, b, equal_var=False)),
                     ("mannwhitney", lambda a, b: stats.mannwhitneyu(a, b, alternative="two-sided"))):
        t0 = time.perf_counter()
        latent_tests(codes, y, test=test)
        t_vec = time.perf_counter() - t0
        t0 = time.perf_counter()
        for j in range(args.latents):
            fn(codes[y == 1, j], codes[y == 0, j])
        t_loop = time.perf_counter() - t0
        print(f"[2] {test}: vectorised {t_vec:.2f} s vs per-latent loop {t_loop:.2f} s over {args.latents} latents "
              f"x {args.rows} rows: {t_loop / t_vec:.1f}x faster")


if __name__ == "__main__":
    main()
