"""Does a same-family example raise p(y_i | x_i) in context? The saved utility tiles of a grid job, by family.

UF_ij = d(GT_i, p(y_i | x_i)) - d(GT_i, p(y_i | x_j, y_j, x_i)), d = ||1 - p||_2 / sqrt(T) (the card), for the
seed-0 pool of the small scale (100 pairs, two tiles of 64 a side), averaged over same-family and
other-family pairs (i != j)::

    PYTHONPATH=. python paper_repro/delift/kernel_families.py runs/repro/delift/small/instruction_s0/utility/pool
"""
import sys, numpy as np
from metafit.data.unseen_instructions import make_unseen
folder = sys.argv[1]
pool = make_unseen(100, seed=0, tasks=("opposite", "capital", "sound", "colour", "bracket", "twice"),
                   mix=(0.35, 0.25, 0.15, 0.1, 0.1, 0.05))
bare = np.load(f"{folder}/bare.npy")[0]
joined = np.block([[np.load(f"{folder}/tile_{q}_{e}.npy")[0] for e in range(2)] for q in range(2)])
U = bare[:, None] - joined                      # [query i, example j]
fam = np.array([p.task for p in pool]); same = fam[:, None] == fam[None, :]; np.fill_diagonal(same, False)
other = fam[:, None] != fam[None, :]
print(f"d(no example) mean {bare.mean():.3f}; utility same family {U[same].mean():.4f} (n {same.sum()}), other {U[other].mean():.4f}")
for t in dict.fromkeys(fam):
    m = fam == t; s = same & m[:, None]; o = other & m[:, None]
    print(f"  {t}: bare {bare[m].mean():.3f} same {U[s].mean():.4f} other {U[o].mean():.4f}")
