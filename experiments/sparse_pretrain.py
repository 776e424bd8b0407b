"""Sparse pretraining of a tiny byte-level GPT (gradual magnitude pruning or RigL) on a device mesh.

The corpus is the bytes of the Python standard library's ``*.py`` files (offline, deterministic
order); the last 10% is held out. Batch ``i`` is a pure function of ``(seed, i)``, so a run
interrupted at any step and restarted with ``--resume`` continues with exactly the same data,
params, masks, optimizer state and PRNG key. Params, masks and Adam moments live on a
``data x model`` mesh (``--mesh 2,4``); pruning ramps to ``--sparsity`` with the Zhu & Gupta
polynomial schedule through :func:`jaxprune.pruner` (or RigL at constant ``--sparsity`` with
``--method rigl``). Logs loss and tokens/s; checkpoints every ``--ckpt-every`` steps (orbax, async);
writes a compact sparse checkpoint at the end.

Multi-process: under ``jaxprune launch -n N [--devices-per-process D] -- <this command>`` every
process joins one JAX job (:func:`jaxprune.io.distributed.initialize`); the default ``--mesh auto``
is ``N x D`` (``data`` across processes, ``model`` inside one), params, masks and Adam moments are
sharded over it. Data comes through a grain pipeline
(:class:`jaxprune.io.data.ProcessBatches`): global batch ``t`` is records ``t*B..t*B+B-1``
of a random-access source of byte windows (:class:`Windows`, window ``k`` a pure function of the
seed and ``k``), and each process reads only its rows of it (grain ``ShardOptions`` by process).
Orbax writes each process's shards into the one checkpoint directory, together with every
process's grain iterator state (item ``data``), whose position is the global step on every
process; so a checkpoint resumes with any process count (2 -> 1, 1 -> 2) on exactly the batches
the uninterrupted run would see, and a data state that disagrees with the train state's
``data_pos`` or between processes is an error. After every checkpoint the masks are checked to be
identical on every process (:func:`jaxprune.io.distributed.assert_consistent`).

Examples::

    python -m experiments.sparse_pretrain --quick                    # CPU, ~1 minute
    python -m experiments.sparse_pretrain --quick --cpu-devices 8 --mesh 2,4
    python -m experiments.sparse_pretrain --steps 2000 --ckpt-dir /tmp/run --resume
    jaxprune launch -n 2 --devices-per-process 2 -- python -m experiments.sparse_pretrain --quick
    # multi-host (one process per host, cluster auto-detected by JAX): add --distributed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from . import _common

pos_int = _common.positive_int


def build_parser() -> argparse.ArgumentParser:
    """The experiment's command-line flags (counts are validated: ``--steps -5`` exits 2)."""
    p = _common.parser("jaxprune run sparse_pretrain", __doc__, lr=3e-3)
    p.add_argument("--steps", type=pos_int, default=None, help="training steps (default 2000)")
    p.add_argument("--batch", type=pos_int, default=None, help="global batch size (default 32)")
    p.add_argument("--seq", type=pos_int, default=None, help="sequence length (default 128)")
    p.add_argument("--d-model", type=pos_int, default=None, help="width (default 256)")
    p.add_argument("--layers", type=pos_int, default=None, help="decoder blocks (default 4)")
    p.add_argument("--heads", type=pos_int, default=None, help="attention heads (default 4)")
    p.add_argument("--sparsity", type=float, default=0.85, help="final sparsity (0.8-0.9)")
    p.add_argument("--prune-begin", type=float, default=0.1, help="ramp start, fraction of steps")
    p.add_argument("--prune-end", type=float, default=0.7, help="ramp end, fraction of steps")
    p.add_argument("--prune-every", type=pos_int, default=None, help="mask update period (steps)")
    p.add_argument("--allocation", default="uniform", help="uniform | erk | global")
    p.add_argument("--method", choices=("gradual", "rigl"), default="gradual",
                   help="gradual magnitude pruning (ramp) or RigL (constant --sparsity)")
    p.add_argument("--mesh", default="auto", type=_common.mesh_shape,
                   help="data,model mesh shape, e.g. 2,4; auto = processes x devices per process")
    p.add_argument("--cpu-devices", type=pos_int, default=None,
                   help="number of virtual CPU devices (set before JAX starts)")
    p.add_argument("--seed", type=_common.nonnegative_int, default=0)
    p.add_argument("--ckpt-dir", default=None,
                   help="checkpoint directory (default <results dir>/sparse_pretrain_ckpt)")
    p.add_argument("--ckpt-every", type=pos_int, default=None, help="checkpoint period (steps)")
    p.add_argument("--keep", type=pos_int, default=2, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--stop-after", type=pos_int, default=None,
                   help="exit after this step (simulates an interrupted run)")
    p.add_argument("--crash-after", type=pos_int, default=None,
                   help="fault injection: the last process exits abruptly (code 13) once the "
                        "checkpoint of this step is on disk")
    p.add_argument("--dump-state", default=None,
                   help="write the final params and masks (full arrays) to this .npz")
    p.add_argument("--log-every", type=pos_int, default=None)
    p.add_argument("--no-final-eval", action="store_true",
                   help="skip the held-out loss and the compact checkpoint at the end")
    p.add_argument("--corpus-bytes", type=pos_int, default=4_000_000)
    p.add_argument("--out", default=None, help="write the final metrics as JSON here")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize (multi-host slice)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
    p.add_argument("--num-processes", type=pos_int, default=None)
    p.add_argument("--process-id", type=_common.nonnegative_int, default=None)
    return p


QUICK = dict(steps=60, batch=16, seq=64, d_model=64, layers=2, heads=4, prune_every=5,
             ckpt_every=20, log_every=10)
FULL = dict(steps=2000, batch=32, seq=128, d_model=256, layers=4, heads=4, prune_every=50,
            ckpt_every=500, log_every=100)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset size flags from the ``--quick`` or full preset."""
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.ckpt_dir is None:
        args.ckpt_dir = str(_common.results_dir(args, create=False) / "sparse_pretrain_ckpt")
    return args


def load_corpus(max_bytes: int) -> np.ndarray:
    """Bytes of the stdlib's ``*.py`` files in sorted order, up to ``max_bytes`` (uint8)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in sorted(root.glob("*.py")):
        b = f.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
    if data.size < 10_000:
        raise RuntimeError(f"sparse_pretrain: stdlib corpus under {root} is too small")
    return data


class Windows:
    """A random-access source of ``n`` byte windows of ``data``: record ``k`` is ``seq`` bytes
    (int32) from an offset drawn by ``np.random.default_rng([seed, k])`` -- a pure function of
    ``k``, so any process can read any record, and the stream does not depend on ``n``.

    >>> w = Windows(np.arange(100, dtype=np.uint8), seq=4, seed=0, n=10)
    >>> len(w), w[3].shape, bool((w[3] == w[3][0] + np.arange(4)).all())
    (10, (4,), True)
    """

    def __init__(self, data: np.ndarray, seq: int, seed: int, n: int):
        if data.size <= seq:
            raise ValueError(f"sparse_pretrain: {data.size} bytes cannot hold a {seq}-byte window")
        self.data, self.seq, self.seed, self.n = data, int(seq), int(seed), int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.n:
            raise IndexError(f"window {k} of {self.n}")
        start = int(np.random.default_rng([self.seed, int(k)]).integers(0, self.data.size - self.seq))
        return self.data[start:start + self.seq].astype(np.int32)

    def key(self) -> str:
        """What identifies the stream (saved with the iterator state, checked on resume)."""
        return (f"windows(bytes={self.data.size}, crc={zlib.crc32(self.data.tobytes())}, "
                f"seq={self.seq}, seed={self.seed})")


def batches(data: np.ndarray, seed: int, steps: int, batch: int, seq: int,
            sharding: Any = None) -> Any:
    """This process's rows of global batches ``0..steps-1`` of ``batch`` windows each, through
    grain (:class:`jaxprune.io.data.ProcessBatches`); ``sharding`` is the batch sharding.
    """
    from jaxprune.io.data import ProcessBatches

    src = Windows(data, seq, seed, steps * batch)
    return ProcessBatches(src, batch, sharding, key=src.key())


def main(argv: list[str] | None = None) -> int:
    """Run the experiment; returns the process exit code."""
    args = resolve(build_parser().parse_args(argv))
    if not 0.0 <= args.sparsity < 1.0:
        print(f"sparse_pretrain: --sparsity must be in [0, 1), got {args.sparsity}")
        return 2
    import jax

    from jaxprune.io import distributed as dist
    from jaxprune.io import sharding as shd

    dist.initialize(args.coordinator, args.num_processes, args.process_id,
                    local_cpu_devices=args.cpu_devices, auto=args.distributed)
    import optax

    import jaxprune as jp
    from jaxprune.io import checkpoint as ck
    from jaxprune.io import compact
    from jaxprune.io import data as data_lib
    from jaxprune.zoo.models.tiny_lm import TinyLM, lm_loss

    if args.mesh == "auto":
        mesh = dist.global_mesh()
    else:
        mesh = dist.global_mesh(*args.mesh)
    data_ax = mesh.shape["data"]
    if args.batch % data_ax or args.batch % jax.process_count():
        print(f"sparse_pretrain: --batch {args.batch} not divisible by data axis {data_ax} and "
              f"{jax.process_count()} processes")
        return 2
    corpus = load_corpus(args.corpus_bytes)
    split = int(0.9 * corpus.size)
    train_data, val_data = corpus[:split], corpus[split:]

    model = TinyLM(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                   max_len=args.seq)
    # one compiled init (eager init compiles every op separately: ~3x slower for a tiny model)
    params = jax.jit(model.init)(jax.random.key(args.seed), np.zeros((1, args.seq), np.int32))["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    begin = int(args.prune_begin * args.steps)
    end = max(begin + 1, int(args.prune_end * args.steps))
    inner = optax.adamw(args.lr, weight_decay=0.0)
    if args.method == "rigl":
        from jaxprune.training.dst import rigl

        tx = rigl(inner, args.sparsity, allocation=args.allocation, update_period=args.prune_every,
                  total_steps=args.steps, key=jax.random.key(args.seed + 1))
        may_update = np.arange(args.steps + 1) % args.prune_every == 0
    else:
        schedule = jp.Polynomial(args.sparsity, begin=begin, end=end, freq=args.prune_every)
        tx = jp.pruner(inner, schedule=schedule, allocation=args.allocation)
        may_update = np.asarray(schedule.should_update(np.arange(args.steps + 1)))
    state, shardings = shd.init_train_state(params, tx, mesh, seed=args.seed)
    bsh = shd.batch_sharding(mesh)

    def loss_fn(p, tokens, rng):
        return lm_loss(model.apply({"params": p}, tokens), tokens)

    train_step = shd.make_sharded_train_step(loss_fn, tx, shardings, bsh)
    eval_loss = jax.jit(lambda p, t: loss_fn(p, t, None), in_shardings=(shardings.params, bsh))

    ckpt_dir = os.path.abspath(args.ckpt_dir)
    config = {k: v for k, v in vars(args).items()
              if k not in ("resume", "stop_after", "out", "results_dir", "crash_after",
                           "dump_state", "coordinator", "num_processes", "process_id",
                           "cpu_devices")}
    mgr = ck.CheckpointManager(ckpt_dir, max_to_keep=args.keep,
                               items={"data": data_lib.ProcessBatchesHandler()})
    train_batches = batches(train_data, args.seed, args.steps, args.batch, args.seq, bsh)
    if args.resume and mgr.latest_step() is not None:
        state, saved_cfg = mgr.restore(
            state, items={"data": data_lib.ProcessBatchesRestore(train_batches)})
        if train_batches.position != int(state.data_pos):
            print(f"sparse_pretrain: the checkpoint's data iterator is at global batch "
                  f"{train_batches.position} but its train state consumed {int(state.data_pos)}; "
                  "refusing to resume on different data")
            mgr.close()
            return 1
        print(f"resumed from step {int(state.step)} in {ckpt_dir} (saved config: "
              f"d_model={saved_cfg.get('d_model')}, layers={saved_cfg.get('layers')}; data "
              f"at global batch {train_batches.position})")
    elif not args.resume and mgr.latest_step() is not None:
        print(f"sparse_pretrain: {ckpt_dir} already has step {mgr.latest_step()}; pass --resume "
              "to continue it or choose another --ckpt-dir")
        mgr.close()
        return 2

    pid = jax.process_index()
    start = int(state.step)
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    print(f"TinyLM d_model={args.d_model} layers={args.layers} params={n_params:,} "
          f"mesh={dict(mesh.shape)} devices={jax.device_count()} ({jax.devices()[0].platform}, "
          f"{jax.process_count()} processes) "
          f"batch={args.batch}x{args.seq} steps {start}->{last} target sparsity {args.sparsity}")
    t_window, tok_window, rates = None, 0, []
    loss = float("nan")
    for i in range(start, last):
        assert int(state.data_pos) == i == train_batches.position  # data position is state
        tokens = shd.shard_batch(next(train_batches), bsh)
        # the host knows the schedule: steps that cannot update masks run without the cond
        state, loss_arr = train_step(state, tokens, bool(may_update[i]))
        step = i + 1
        if t_window is None:  # first step compiles; time from its end
            jax.block_until_ready(loss_arr)
            t_window, tok_window = time.perf_counter(), 0
        else:
            tok_window += args.batch * args.seq
        if step % args.log_every == 0 or step == last:
            loss = float(loss_arr)
            dt = time.perf_counter() - t_window
            tps = tok_window / dt if dt > 0 and tok_window else float("nan")
            if tok_window:
                rates.append(tps)
            # global arrays (spread over processes): reduced on the devices, same on every process
            sp = jp.total_sparsity(state.params, jp.get_masks(state.opt_state))
            print(f"step {step:6d}  loss {loss:.4f}  sparsity {sp:.6f}  tokens/s {tps:,.0f}")
            t_window, tok_window = time.perf_counter(), 0
        if step % args.ckpt_every == 0 or step == last:
            mgr.save(step, state, config=config, force=step == last,
                     items={"data": data_lib.ProcessBatchesSave(train_batches.get_state())})
            if jax.process_count() > 1:
                dist.assert_consistent(jp.get_masks(state.opt_state), f"masks at step {step}")
        if args.crash_after == step:
            mgr.wait()
            if pid == jax.process_count() - 1:
                print(f"sparse_pretrain: --crash-after {step}: process {pid} exits abruptly",
                      flush=True)
                os._exit(13)
    mgr.close()  # waits for async saves; raises if any failed
    if last < args.steps:
        print(f"stopped after step {last} (--stop-after); continue with --resume")
        return 0

    masks = jp.get_masks(state.opt_state)
    fingerprint = dist.assert_consistent(masks, "final masks")
    sparsity = jp.total_sparsity(state.params, masks)  # on the devices (a collective)
    host_params, host_masks = dist.to_host((state.params, masks))  # collective: all processes
    metrics: dict[str, Any] = {
        "params": int(n_params), "steps": args.steps, "final_train_loss": loss,
        "sparsity_pruned_leaves": float(sparsity),
        "tokens_per_s_median": float(np.median(rates)) if rates else float("nan"),
        "mesh": dict(mesh.shape), "platform": jax.devices()[0].platform,
        "processes": jax.process_count(), "method": args.method,
        "mask_fingerprint": fingerprint,
    }
    if args.dump_state and pid == 0:
        from jaxprune.core.masks import leaves_with_paths

        arrays = {f"params/{k}": v for k, v in leaves_with_paths(host_params)}
        arrays.update({f"masks/{k}": v for k, v in leaves_with_paths(host_masks) if v is not None})
        with _common.atomic_open(args.dump_state, "wb") as f:
            np.savez(f, **arrays)
    if not args.no_final_eval:
        val = np.mean([float(eval_loss(state.params, shd.shard_batch(b, bsh)))
                       for b in batches(val_data, args.seed + 1, 8, args.batch, args.seq, bsh)])
        metrics.update(val_loss_nats=float(val), val_bits_per_byte=float(val / np.log(2)))
        sparse_dir = os.path.join(ckpt_dir, f"sparse_{args.steps}")
        if pid == 0 and os.path.exists(sparse_dir):
            import shutil

            shutil.rmtree(sparse_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sparse_pretrain: compact dir cleared")
        # every process takes part (orbax synchronises them); host arrays are written once
        info = compact.save_sparse(sparse_dir, host_params, host_masks)
        metrics["compact_ckpt_bytes"] = info["bytes"]
        metrics["dense_params_masks_bytes"] = info["dense_bytes"]
        metrics["train_state_ckpt_bytes"] = ck.dir_size(os.path.join(ckpt_dir, str(args.steps)))
    if pid == 0:
        print(json.dumps(metrics, indent=1))
    if args.out and pid == 0:
        _common.write_json(args.out, metrics, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
