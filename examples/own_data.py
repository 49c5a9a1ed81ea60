"""Writes my_tasks.npz, a small multi-label table in the runner's "multilabel" format: X [N, F], Y [N, K]."""

import numpy as np

rng = np.random.default_rng(0)
X = rng.normal(size=(600, 12)).astype(np.float32)
W = rng.normal(size=(12, 4))
Y = (X @ W + rng.normal(scale=0.5, size=(600, 4)) > 0).astype(np.int8)  # 4 binary tasks
np.savez("my_tasks.npz", X=X, Y=Y, labels=np.array(["a", "b", "c", "d"]))
print("wrote my_tasks.npz:", X.shape, Y.shape)
