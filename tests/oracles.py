"""Numpy oracles of the published OBS-family algorithms, shared by the tests (float64, W is
(out, in) as in the reference code): SparseGPT's fasterprune (Frantar & Alistarh 2023) merged with
GPTQ (Frantar et al. 2022), and GPTQ's quantization grid."""

import numpy as np


def ref_grid(x, bits, sym):
    """GPTQ's Quantizer.find_params (weight=True) on rows of x (out, n), float64; symmetric: the
    restricted range xmax / (2**(bits-1) - 1) for every row (see jaxprune.oneshot.quant)."""
    maxq = 2**bits - 1
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = -xmax
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = xmax / (2 ** (bits - 1) - 1) if sym else (xmax - xmin) / maxq
    zero = np.full_like(scale, 2 ** (bits - 1)) if sym else np.round(-xmin / scale)
    return scale, zero


def ref_q(x, scale, zero, bits):
    return scale * (np.clip(np.round(x / scale) + zero, 0, 2**bits - 1) - zero)


def ref_sweep(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01, bits=None,
              group=None, sym=True, act_order=False):
    """GPTQ (Frantar et al. 2022, reference code gptq.py) merged with SparseGPT's fasterprune, as
    the papers describe, W (out, in). Group params: from the block's current weights (kept entries)
    when the sweep reaches the group (== the reference when group == blocksize); with act_order
    "static groups" from the original W. Per-channel (group None): from the original W."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = None
    if bits is not None and (group is None or act_order):
        g = group or cols
        static = [ref_grid(W[:, i:i + g], bits, sym) for i in range(0, cols, g)]
    perm = np.arange(cols)
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    keep = np.ones_like(W, bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = np.zeros_like(W1, bool)  # True = pruned
        if sparsity > 0 and prunen == 0:
            tmp = W1**2 / np.diag(Hinv1)[None, :] ** 2
            k = int(round(tmp.size * sparsity))
            mask1.flat[np.argsort(tmp.ravel(), kind="stable")[:k]] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / np.diag(Hinv1)[i:i + prunem][None, :] ** 2
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                mask1[np.arange(rows)[:, None], i + idx] = True
            q = w.copy()
            q[mask1[:, i]] = 0
            if bits is not None:
                if static is not None:
                    scale, zero = static[perm[i1 + i] // (group or cols)]
                elif (i1 + i) % group == 0:
                    grp = np.where(mask1, 0, W1)[:, i:i + group]
                    for j in range(0, group, prunem or group):  # N:M: the mask it would get now
                        if prunen:
                            tmp = grp[:, j:j + prunem] ** 2 / np.diag(Hinv1)[i + j:i + j + prunem] ** 2
                            idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                            grp[np.arange(rows)[:, None], j + idx] = 0
                    scale, zero = ref_grid(grp, bits, sym)
                q = ref_q(q, scale, zero, bits)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = np.argsort(perm)
    return W[:, inv], keep[:, inv]
