"""Does a same-family example raise p(y_i | x_i) in context? The utility kernel of a pool, by family.

UF_ij = d(GT_i, p(y_i | x_i)) - d(GT_i, p(y_i | x_j, y_j, x_i)) through ``metafit.select.utility_matrix``
(resumable tiles in ``--workdir``), for the seed-``--seed`` pool of ``--n-pool`` pairs with the configs' families
and mix, averaged over same-family and other-family pairs (i != j), with d = ||1 - p||_2 / sqrt(T) (the card's,
``l2``) and d = mean -log p (``kl``, the per-token conditional PMI). Prints the wall time per 1,000 pairs
(only meaningful when no tile was already in ``--workdir``)::

    # the small grid's kernel (its tiles are reused: same model, pool and block)
    PYTHONPATH=. python paper_repro/delift/kernel_families.py --workdir runs/repro/delift/small/instruction_s0/utility/pool
    # SmolLM2-135M-Instruct on a 60-pair pool
    PYTHONPATH=. python paper_repro/delift/kernel_families.py --model smollm2-135m-instruct --n-pool 60 \
        --workdir runs/delift_signal/smollm2_60
"""
import argparse
import time

import numpy as np

from metafit.data.unseen_instructions import make_unseen
from metafit.models import load
from metafit.select import pair_distances, utility_matrix

TASKS = ("opposite", "capital", "sound", "colour", "bracket", "twice")
MIX = (0.35, 0.25, 0.15, 0.1, 0.1, 0.05)  # configs/select/delift_*.yaml


def by_family(utility: np.ndarray, families: np.ndarray) -> dict[str, tuple[float, float]]:
    """Mean utility over same-family and other-family pairs (the diagonal left out), overall and per family."""
    same = families[:, None] == families[None, :]
    np.fill_diagonal(same, False)
    other = families[:, None] != families[None, :]
    out = {"all": (float(utility[same].mean()), float(utility[other].mean()))}
    for family in dict.fromkeys(families):
        rows = (families == family)[:, None]
        out[family] = (float(utility[same & rows].mean()) if (same & rows).any() else float("nan"),
                       float(utility[other & rows].mean()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="metafit-small-lm")
    parser.add_argument("--n-pool", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    pool = make_unseen(args.n_pool, seed=args.seed, tasks=TASKS, mix=MIX)
    model, tokenizer = load(args.model)
    start = time.time()
    utilities = {d: utility_matrix(model, tokenizer, pool, pool, distance=d, workdir=args.workdir, block=args.block)
                 for d in ("l2", "kl")}  # the second distance reads the first's tiles
    seconds = time.time() - start
    bare, _ = pair_distances(model, tokenizer, pool, pool, workdir=args.workdir, block=args.block)  # from the tiles
    families = np.array([p.task for p in pool])
    print(f"{args.model}, pool {args.n_pool} (seed {args.seed}): {args.n_pool ** 2} pairs in {seconds:.0f} s "
          f"({1000 * seconds / args.n_pool ** 2:.1f} s per 1k pairs, tiles already in the workdir excluded)")
    print(f"d(no example) mean: l2 {bare[0].mean():.3f}, kl {bare[1].mean():.3f}")
    for distance, utility in utilities.items():
        table = by_family(utility, families)
        print(f"utility ({distance}): same family {table['all'][0]:.4f}, other family {table['all'][1]:.4f}")
        for family, (same, other) in table.items():
            if family != "all":
                n = int((families == family).sum())
                print(f"  {family} (n {n}): d(no example) l2 {bare[0][families == family].mean():.3f}; "
                      f"same {same:.4f} other {other:.4f}")


if __name__ == "__main__":
    main()
