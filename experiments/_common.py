"""Plumbing shared by every experiment: common flags, the results directory, atomic writes, plots.

* :func:`parser` -- an ``ArgumentParser`` with ``--quick`` and ``--results-dir`` and, when the
  experiment passes a default, ``--steps`` / ``--seeds`` / ``--lr``; counts are validated by
  argparse (:func:`positive_int`: ``--steps -5`` exits with status 2 and a clear message).
* :func:`results_dir` -- ``--results-dir``, else ``$JAXPRUNE_RESULTS_DIR``, else ``./results`` of the
  current directory (from the repository root that is the committed ``results/``).
* :func:`output_path` -- ``<results dir>/<name>``, with ``_quick`` before the suffix for ``--quick``
  runs, so a smoke run never overwrites the committed full results.
* :func:`atomic_open`, :func:`write_csv`, :func:`write_json`, :func:`save_figure` -- write to a
  temporary file in the same directory and ``os.replace`` it at the end: a run that fails half-way
  leaves the previous file intact; :func:`write_csv` refuses an empty table before touching anything.
* :func:`figure`, :func:`errorbar_plot` -- matplotlib figures without pyplot's global state.
* :func:`format_table` -- the aligned text table an experiment prints (one ``(header, format
  spec)`` per column).
* :func:`train_lm`, :func:`finish_lm_training`, :func:`save_model`, :func:`load_model`,
  :func:`lm_template`, :func:`load_or_train_lm` -- the byte LMs trained once (``train_gpt``,
  ``train_moe``) and reused from the results directory.

Example:
    >>> ap = parser("jaxprune run example", "An example.", steps=100, seeds=3)
    >>> a = ap.parse_args(["--quick", "--results-dir", "/tmp/r"])
    >>> a.steps, a.seeds, output_path(a, "example.csv").name
    (100, 3, 'example_quick.csv')
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "RESULTS_ENV", "positive_int", "nonnegative_int", "positive_float", "unit_fraction", "parser",
    "results_dir", "output_path", "atomic_open", "write_csv", "write_json", "figure", "save_figure",
    "errorbar_plot", "peak_rss", "format_table", "lm_template", "save_model", "load_model",
    "load_or_train_lm", "finish_lm_training", "train_lm",
]

#: environment variable naming the default results directory (``--results-dir`` wins over it)
RESULTS_ENV = "JAXPRUNE_RESULTS_DIR"


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None


def _int_at_least(text: str, lo: int, what: str) -> int:
    v = _number(text, int, "an integer")
    if v < lo:
        raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (step counts, batch sizes).

    >>> positive_int("3")
    3
    >>> positive_int("-5")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be a positive integer (>= 1), got -5
    """
    return _int_at_least(text, 1, "a positive integer (>= 1)")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0.

    >>> nonnegative_int("0")
    0
    """
    return _int_at_least(text, 0, "an integer >= 0")


def mesh_shape(text: str) -> str | tuple[int, int]:
    """argparse type: ``auto`` or a ``data,model`` mesh shape of two integers >= 1.

    >>> mesh_shape("2,4"), mesh_shape("auto")
    ((2, 4), 'auto')
    >>> mesh_shape("2")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be 'auto' or data,model (two integers >= 1, e.g. 2,4), got '2'
    """
    if text.strip().lower() == "auto":
        return "auto"
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or data,model (two integers >= 1, e.g. 2,4), got {text!r}")
    return shape


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates).

    >>> positive_float("3e-3")
    0.003
    """
    v = _number(text, float, "a number")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def unit_fraction(text: str) -> float:
    """argparse type: a number in ``(0, 1)`` (a sparsity, a fraction of units removed).

    >>> unit_fraction("0.9")
    0.9
    >>> unit_fraction("1.5")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be in (0, 1), got 1.5
    """
    v = _number(text, float, "a number")
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def parser(prog: str, description: str | None = None, *, steps: int | None = None,
           seeds: int | None = None, lr: float | None = None) -> argparse.ArgumentParser:
    """The experiment's parser with the common flags.

    Always ``--quick`` (a smoke run; its files get a ``_quick`` suffix) and ``--results-dir``;
    ``--steps`` (training steps), ``--seeds`` (number of seeds, ``0..seeds-1``) and ``--lr`` only
    when a default is given. Add the experiment's own flags to the returned parser.

    >>> ap = parser("demo", steps=10)
    >>> ap.parse_args([]).steps, ap.parse_args([]).results_dir
    (10, None)
    """
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run (its files get a _quick suffix)")
    ap.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                    help=f"where results go (default: ${RESULTS_ENV}, else ./results)")
    if steps is not None:
        ap.add_argument("--steps", type=positive_int, default=steps,
                        help=f"training steps (default {steps})")
    if seeds is not None:
        ap.add_argument("--seeds", type=positive_int, default=seeds,
                        help=f"number of seeds, run as 0..N-1 (default {seeds})")
    if lr is not None:
        ap.add_argument("--lr", type=positive_float, default=lr, help=f"learning rate (default {lr:g})")
    return ap


def results_dir(args: argparse.Namespace | str | os.PathLike | None = None, *,
                create: bool = True) -> Path:
    """The results directory: ``args.results_dir`` (or ``args`` itself when it is a path), else
    ``$JAXPRUNE_RESULTS_DIR``, else ``./results``; created unless ``create=False``.

    >>> results_dir(argparse.Namespace(results_dir=Path("/tmp/r")), create=False)
    PosixPath('/tmp/r')
    """
    d = args if isinstance(args, (str, os.PathLike)) else getattr(args, "results_dir", None)
    if d is None:
        d = os.environ.get(RESULTS_ENV) or "results"
    out = Path(d)
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def output_path(args: argparse.Namespace, name: str) -> Path:
    """``<results dir>/<name>``; for a ``--quick`` run ``_quick`` goes before the suffix.

    >>> a = argparse.Namespace(results_dir=Path("/tmp/r"), quick=True)
    >>> str(output_path(a, "pai.csv"))
    '/tmp/r/pai_quick.csv'
    """
    p = Path(name)
    if getattr(args, "quick", False):
        p = p.with_name(f"{p.stem}_quick{p.suffix}")
    return results_dir(args) / p


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    If the ``with`` body raises, the temporary file is removed and ``path`` keeps its old content.
    The new file keeps an existing file's permissions (else the umask's default).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x.txt"
    >>> with atomic_open(p) as f:
    ...     _ = f.write("new")
    >>> p.read_text()
    'new'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if path.exists():
            mode_bits = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode_bits = 0o666 & ~umask
        os.chmod(tmp, mode_bits)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              fieldnames: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) as CSV atomically; columns: ``fieldnames`` or the first row's keys.

    An empty ``rows`` raises ``ValueError`` before ``path`` is touched.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = write_csv(p, [{"a": 1, "b": 2}])
    >>> p.read_text().split()
    ['a,b', '1,2']
    """
    path = Path(path)
    if not rows:
        raise ValueError(f"no rows to write to {path}: nothing was run (empty sweep?); "
                         "the existing file is left as it was")
    fields = list(fieldnames) if fieldnames is not None else list(rows[0])
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, **kwargs: Any) -> Path:
    """Write ``obj`` as JSON (trailing newline) atomically; ``kwargs`` go to :func:`json.dumps`.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "t.json"
    >>> json.loads(write_json(p, {"a": 1}).read_text())
    {'a': 1}
    """
    path = Path(path)
    text = json.dumps(obj, indent=indent, **kwargs) + "\n"  # serialise first: a failure writes nothing
    with atomic_open(path, "w") as f:
        f.write(text)
    return path


def figure(figsize: tuple[float, float] = (6, 4), ncols: int = 1) -> tuple[Any, Any]:
    """``(fig, ax)`` (``ax`` an array when ``ncols > 1``): a matplotlib Figure without pyplot.

    >>> fig, ax = figure()
    >>> type(ax).__name__
    'Axes'
    """
    from matplotlib.figure import Figure  # Agg canvas: no pyplot, no global backend switch

    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, ncols)
    return fig, axes


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """``fig.tight_layout()`` and save to ``path`` atomically (the format from its suffix).

    >>> import tempfile
    >>> fig, ax = figure()
    >>> save_figure(fig, Path(tempfile.mkdtemp()) / "f.png").read_bytes()[:4]
    b'\\x89PNG'
    """
    path = Path(path)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def errorbar_plot(path: str | os.PathLike,
                  series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]], *,
                  xlabel: str, ylabel: str, title: str = "", hline: tuple[float, str] | None = None,
                  xscale: str = "linear", invert_x: bool = False,
                  figsize: tuple[float, float] = (6, 4)) -> Path:
    """One line with error bars per ``{label: (xs, means, stds)}``; optional ``hline=(y, label)``.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "e.png"
    >>> errorbar_plot(p, {"a": ([0.5, 0.9], [90, 80], [1, 2])}, xlabel="x", ylabel="y").exists()
    True
    """
    fig, ax = figure(figsize)
    for label, (xs, ms, sds) in series.items():
        if len(xs):
            ax.errorbar(list(xs), list(ms), yerr=list(sds), marker="o", capsize=3, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="k", ls="--", label=hline[1])
    ax.set_xscale(xscale)
    if invert_x:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# [[fill]align][sign][z][#][0][width][grouping][.precision][type] (Python's format mini-language)
_SPEC = re.compile(r"(?:(?P<fill>.)?(?P<align>[<>=^]))?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.\d+)?"
                   r"(?P<type>[bcdeEfFgGnosxX%]?)")


def format_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]],
                 sep: str = " ") -> str:
    """An aligned text table: a header line, then one line per row, cells joined by ``sep``.

    ``columns`` are ``(header, format spec)`` pairs; cell ``i`` of a row is formatted with spec
    ``i`` (``"28s"``, ``">8.2f"``, ``"9d"``, ...). A header takes its spec's width and alignment;
    without an explicit alignment it is right-aligned for a numeric type (``d``, ``f``, ``e``,
    ``g``, ``%``, ...) and left-aligned otherwise, as the values are.

    >>> print(format_table([("model", "8s"), ("ppl", "6.2f"), ("n", ">3")],
    ...                    [("gpt", 3.14159, 7), ("moe", 12.5, 16)]))
    model       ppl   n
    gpt        3.14   7
    moe       12.50  16
    >>> format_table([("a", "q")], [])
    Traceback (most recent call last):
    ValueError: format_table: column 'a' has an invalid format spec 'q'
    """
    heads = []
    for head, spec in columns:
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise ValueError(f"format_table: column {head!r} has an invalid format spec {spec!r}")
        numeric = m["type"] not in ("", "s", "c")
        align = {"=": ">", None: ">" if numeric else "<"}.get(m["align"], m["align"])
        heads.append(f"{head:{align}{m['width']}}")
    lines = [sep.join(heads)]
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"format_table: row {i} has {len(row)} cells for {len(columns)} columns "
                             f"({', '.join(h for h, _ in columns)})")
        lines.append(sep.join(format(v, spec) for v, (_, spec) in zip(row, columns, strict=True)))
    return "\n".join(lines)


def set_xla_threads(n: int) -> bool:
    """Limit XLA:CPU to ``n`` intra-op threads if no JAX backend has started yet (benchmarks).

    >>> set_xla_threads(0)
    False
    """
    from jax._src import xla_bridge

    if n <= 0 or xla_bridge._backends:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    extra = f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'} "
    extra += f"intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
    return True


class PeakRSS:
    """Peak resident memory seen by :func:`peak_rss` (``mb``), and whether it was sampled over the
    block (``sampled``) or is the process-lifetime peak (no ``/proc``: ``ru_maxrss``)."""

    def __init__(self) -> None:
        self.mb, self.sampled = 0.0, False


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def peak_rss(interval: float = 0.05) -> Iterator[PeakRSS]:
    """Peak resident set size (MiB) *during* the block: a thread samples ``/proc/self/statm``
    every ``interval`` s (a short spike between samples can be missed). Without ``/proc`` it
    reports the process-lifetime peak ``ru_maxrss`` and sets ``sampled=False``.

    >>> with peak_rss() as p:
    ...     x = bytearray(50 * 2**20)
    >>> p.mb > 50 or not p.sampled
    True
    """
    import resource
    import threading

    out = PeakRSS()
    first = _rss_mb()
    if first is None:
        try:
            yield out
        finally:
            out.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return
    out.mb, out.sampled = first, True
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            out.mb = max(out.mb, _rss_mb() or 0.0)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out.mb = max(out.mb, _rss_mb() or 0.0)


@contextlib.contextmanager
def optional_plot(name: str) -> Iterator[None]:
    """Run a plotting block; a failure there (no display backend, a missing font) is reported, not
    raised, because the table and the JSON/CSV are already written.

    >>> with optional_plot("demo.png"):
    ...     raise RuntimeError("no backend")
    (plot demo.png skipped: RuntimeError: no backend)
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the results are written; the figure is a bonus
        print(f"(plot {name} skipped: {type(e).__name__}: {e})")


class CompileStats:
    """Compilations seen by :func:`compile_stats`: ``count`` XLA compiles, ``compile_s`` seconds
    in XLA, ``trace_s`` seconds tracing and lowering to MLIR (all of it is compile-time cost)."""

    def __init__(self) -> None:
        self.count, self.compile_s, self.trace_s = 0, 0.0, 0.0

    @property
    def total_s(self) -> float:
        """Tracing + lowering + XLA compile seconds."""
        return self.compile_s + self.trace_s

    def as_dict(self) -> dict[str, float]:
        """``{"compiles", "compile_s", "trace_s", "total_compile_s"}`` for a results file."""
        return {"compiles": self.count, "compile_s": round(self.compile_s, 3),
                "trace_s": round(self.trace_s, 3), "total_compile_s": round(self.total_s, 3)}


@contextlib.contextmanager
def compile_stats() -> Iterator[CompileStats]:
    """Count JAX compilations and their time inside the ``with`` block (``jax.monitoring``).

    >>> import jax, jax.numpy as jnp
    >>> with compile_stats() as c:
    ...     _ = jax.jit(lambda x: x * 3)(jnp.ones(7))
    >>> c.count >= 1 and c.total_s > 0
    True
    """
    import jax

    st = CompileStats()

    def listen(event: str, secs: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            st.count += 1
            st.compile_s += secs
        elif event in ("/jax/core/compile/jaxpr_trace_duration",
                       "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            st.trace_s += secs

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield st
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def model_files(stem: str, results: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(params, config)`` paths of the model trained under ``stem`` in the results directory.

    >>> [p.name for p in model_files("gpt", "/tmp")]
    ['gpt_params.msgpack', 'gpt_config.json']
    """
    d = results_dir(results, create=False)
    return d / f"{stem}_params.msgpack", d / f"{stem}_config.json"


def save_model(stem: str, params: Any, config: Any, info: dict,
               results: str | os.PathLike | None = None) -> None:
    """Write a trained model's params (flax msgpack) and ``{"config", "info"}`` JSON, atomically."""
    from flax import serialization

    params_file, config_file = model_files(stem, results)
    with atomic_open(params_file, "wb") as f:
        f.write(serialization.to_bytes(params))
    write_json(config_file, {"config": config._asdict(), "info": info})


def load_model(stem: str, make: Any, results: str | os.PathLike | None = None) -> Any:
    """``(config, params, info)`` of a saved model, or ``None`` when it is absent; ``make(config_dict)``
    returns ``(config, params_template)``."""
    from flax import serialization

    params_file, config_file = model_files(stem, results)
    if not (params_file.exists() and config_file.exists()):
        return None
    meta = json.loads(config_file.read_text())
    cfg, template = make(meta["config"])
    return cfg, serialization.from_bytes(template, params_file.read_bytes()), meta["info"]


def lm_template(model_cls: Callable[[Any], Any], cfg: Any) -> Any:
    """The params tree of ``model_cls(cfg)`` as shapes and dtypes (``jax.eval_shape`` of its
    ``init`` on ``(1, cfg.seq)`` tokens: nothing is computed), the template a saved LM is read into.

    >>> from jaxprune.zoo.models.gpt import GPT, GPTConfig
    >>> lm_template(GPT, GPTConfig(d=16, layers=1, heads=2, seq=8))["embed"]["pos"]["embedding"]
    ShapeDtypeStruct(shape=(8, 16), dtype=float32)
    """
    import jax
    import jax.numpy as jnp

    tokens = jax.ShapeDtypeStruct((1, cfg.seq), jnp.int32)
    return jax.eval_shape(model_cls(cfg).init, jax.random.key(0), tokens)["params"]


def load_or_train_lm(stem: str, model_cls: Callable[[Any], Any], cfg: Any,
                     train: Callable[[], tuple[Any, dict]], *, save: bool = True,
                     retrain: bool = False, results: str | os.PathLike | None = None
                     ) -> tuple[Any, Any, dict]:
    """``(config, params, info)`` of the byte LM saved under ``stem`` in the results directory.

    When none is saved (or ``retrain``), ``train()`` returns ``(params, info)`` for the config
    ``cfg``, which are saved unless ``save=False`` (a smoke run). A saved config is rebuilt as
    ``type(cfg)(**saved)`` and its params read into :func:`lm_template`'s tree for ``model_cls``.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from jaxprune.zoo.models.gpt import GPT, GPTConfig
    >>> d, cfg = tempfile.mkdtemp(), GPTConfig(d=16, layers=1, heads=2, seq=8)
    >>> trained = lambda: (GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), int))["params"],
    ...                    {"val_ppl": 9.0})
    >>> c, p, info = load_or_train_lm("tiny", GPT, cfg, trained, results=d)   # trains and saves
    >>> c2, p2, info2 = load_or_train_lm("tiny", GPT, cfg, None, results=d)   # loads: no training
    >>> c2 == cfg, info2, bool((p2["head"]["lm_head"]["kernel"] == p["head"]["lm_head"]["kernel"]).all())
    (True, {'val_ppl': 9.0}, True)
    """
    def make(config: dict) -> tuple[Any, Any]:
        c = type(cfg)(**config)
        return c, lm_template(model_cls, c)

    if not retrain:
        saved = load_model(stem, make, results)
        if saved is not None:
            return saved
    params, info = train()
    if save:
        save_model(stem, params, cfg, info, results)
    return cfg, params, info


def finish_lm_training(args: argparse.Namespace, stem: str, params: Any, cfg: Any, info: dict,
                       *extra: tuple[str, str, str]) -> str:
    """The end of a ``train_<stem>`` run: unless ``args.quick``, save the model under ``stem``
    (:func:`save_model`) and ``info`` as ``train_<stem>.json``; return the one-row summary table
    (steps, batch, seconds, train loss, val ppl from ``info``, then each ``extra`` column given
    as ``(header, format spec, info key)``).

    >>> a = argparse.Namespace(quick=True, results_dir=None)   # --quick: nothing is written
    >>> info = {"steps": 2, "batch": 4, "train_seconds": 0.5, "final_train_loss": 5.1,
    ...         "val_ppl": 150.0, "bpb": 7.2}
    >>> print(finish_lm_training(a, "gpt", None, None, info, ("bpb", ">6.3f", "bpb")))
     steps batch  seconds train loss  val ppl    bpb
         2     4      0.5      5.100  150.000  7.200
    """
    if not args.quick:  # a smoke run saves nothing
        save_model(stem, params, cfg, info, args.results_dir)
        write_json(output_path(args, f"train_{stem}.json"), info)
    columns = [("steps", ">6", "steps"), ("batch", ">5", "batch"), ("seconds", ">8", "train_seconds"),
               ("train loss", ">10.3f", "final_train_loss"), ("val ppl", ">8.3f", "val_ppl"), *extra]
    return format_table([(h, spec) for h, spec, _ in columns], [[info[k] for _, _, k in columns]])


def train_lm(model: Any, loss: Any, records: Any, *, steps: int, batch: int, lr: float,
             seed: int = 0, desc: str = "train", progress: bool = True) -> tuple[Any, dict]:
    """Train a byte-level LM the way the zoo models are trained: AdamW (weight decay 0.1, warmup
    5% then cosine to ``lr/10``, gradient clip 1.0) on ``batch`` random ``records`` per step
    (``(n, seq + 1)`` token rows; ``loss(params, rows)`` is the scalar loss). Returns ``(params,
    {"train_seconds", "final_train_loss"})``.

    >>> import numpy as np, jax.numpy as jnp
    >>> from jaxprune.zoo.models.gpt import GPT, GPTConfig, loss_fn
    >>> m = GPT(GPTConfig(d=16, layers=1, heads=2, seq=8))
    >>> recs = np.random.default_rng(0).integers(0, 256, (32, 9))
    >>> p, info = train_lm(m, lambda p, r: loss_fn(m, p, r), recs, steps=2, batch=4, lr=1e-3,
    ...                    progress=False)
    >>> sorted(info)
    ['final_train_loss', 'train_seconds']
    """
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm.auto import tqdm

    seq = records.shape[1] - 1
    params = model.init(jax.random.key(seed), jnp.zeros((1, seq), jnp.int32))["params"]
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.1))
    opt = tx.init(params)

    @jax.jit
    def step(p: Any, o: Any, r: Any) -> tuple[Any, Any, Any]:
        value, g = jax.value_and_grad(lambda q: loss(q, r))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, value

    rng = np.random.default_rng(seed)
    t0 = time.time()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    last = float("nan")
    for i in bar:
        params, opt, value = step(params, opt, records[rng.integers(0, len(records), batch)])
        if i % 20 == 0 or i == steps - 1:
            last = float(value)
            bar.set_postfix(loss=f"{last:.3f}")
    return params, {"train_seconds": round(time.time() - t0, 1), "final_train_loss": last}
