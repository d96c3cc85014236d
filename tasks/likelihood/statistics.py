"""Statistics of exact observations, computed once per data set, and the fused pass.

- Families whose likelihood depends on the data only through sufficient statistics (normal,
  lognormal, gamma, exponential, poisson, ...) read weighted moments of x, log x, ... that are
  computed in one chunked pass per data set and cached: every optimiser step after the first costs
  a handful of scalar operations, whatever the sample size. Start rules read the same moments.
- Families without them (Student-t, Weibull) declare a fused pass (`FusedPass`): a custom autograd
  function walks the data in cache-sized chunks and returns the total with its closed-form
  gradient, so no N-sized temporary is made and the backward pass reads no data. Second
  derivatives (the observed information, Newton steps) go through torch's own log_prob, so they
  stay exact. Without a gradient to compute, the pass sums the value only.

Every rule built on these is the same function of the parameters as the generic sum over the
last dimension, with the same broadcasting: parameters of shape (K, 1) (a batched sweep) or
weights of shape (B, n) (bootstrap resamples) give one total per row; several parameter rows
share each chunk of the data.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.autograd import Function

if TYPE_CHECKING:
    from nllflow.families import Family

# elements per chunk (all batch rows together): a chunk and its few temporaries stay in the caches,
# and a pass over 1e7 points is a few hundred operations, not thousands of Python calls
CPU_CHUNK = 1 << 17
CUDA_CHUNK = 1 << 24
# the moment pass's chunks on the CPU: it keeps at most two temporaries, and its fixed cost per
# chunk (a dozen small NumPy operations) was a third of a normal fit at 1e6 with 64K elements
MOMENT_CHUNK = 1 << 18

# a fused pass uses another thread for every this many chunks (see _each_chunk): a thread's start
# and join cost tens of microseconds, a chunk's work a few hundred
MIN_CHUNKS_PER_THREAD = 4

# OpenBLAS's ddot stays in the calling thread up to 10,000 elements (and would otherwise wait on
# threads of its own, as an OpenMP region does)
DOT_PIECE = 1 << 13

# the most elements an ATen elementwise kernel runs on in the calling thread (its GRAIN_SIZE):
# a larger tensor opens an OpenMP region (see CPU_TRANSFORMS)
SERIAL_ELEMENTS = 1 << 15

# `log_sum` multiplies this many values before taking one logarithm: a product of eight values of
# at most 1e38 each stays finite, and the logarithm (4-13 ns an element here) costs an eighth
LOG_GROUP = 8


def _in_calling_thread(function: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., np.ndarray]:
    """`function(x, out)`, a torch elementwise function, applied to a NumPy array in pieces of at
    most SERIAL_ELEMENTS elements, so that no piece opens an OpenMP region; into `out` if given
    (which may be `x` itself), else into a new array."""

    def apply(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        source = torch.from_numpy(x)
        target = torch.empty(source.shape, dtype=source.dtype) if out is None else torch.from_numpy(out)
        if x.size <= SERIAL_ELEMENTS:  # (a 0-d parameter too)
            function(source, target)
            return target.numpy()
        step = max(1, SERIAL_ELEMENTS // max(1, math.prod(x.shape[:-1])))  # along the last dimension
        for s in range(0, x.shape[-1], step):
            function(source[..., s : s + step], target[..., s : s + step])
        return target.numpy()

    return apply


# the transforms whose moments are cached, on torch tensors (CUDA) and on NumPy arrays (the CPU:
# NumPy runs in the calling thread, while each torch operation on more than SERIAL_ELEMENTS opens an
# OpenMP region whose barrier waits for every intra-op thread; on a busy 2-core machine a
# descheduled thread made a 1e6-point moment pass 10-50x slower with torch's 2 threads than with
# NumPy). Logarithms are the exception: torch's vectorised log is twice as fast as NumPy's (without
# AVX-512), so it runs on pieces small enough to stay in the calling thread.
TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "x": lambda x: x,
    "log": torch.log,
    "log1m": lambda x: torch.log1p(-x),
    "lgamma1p": lambda x: torch.lgamma(x + 1),
}
VECTORISED: dict[str, Callable[..., np.ndarray]] = {
    name: _in_calling_thread(lambda x, out, function=function: function(x, out=out))
    for name, function in (("log", torch.log), ("log1p", torch.log1p), ("exp", torch.exp))
}


class Workspace:
    """The arrays one walk over the data writes its temporaries into, chunk after chunk: a fresh
    chunk-sized array costs its page faults again on every chunk (glibc's malloc hands blocks over
    128 KiB to mmap, and a 16-row Student-t pass at 1e5 ran 2.6x slower so). Slot `k` keeps one flat
    array, grown to the largest chunk; walks take workspaces from a pool (`_workspace`), so two
    passes running at once never share one."""

    def __init__(self) -> None:
        self._flat: dict[tuple[int, Any], np.ndarray] = {}

    def array(self, slot: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        size = math.prod(shape)
        flat = self._flat.get((slot, dtype))
        if flat is None or flat.size < size:
            flat = self._flat[(slot, dtype)] = np.empty(size, dtype)
        return flat[:size].reshape(shape)


_WORKSPACES: list[Workspace] = []
_WORKSPACES_LOCK = threading.Lock()
# the workspaces the pool keeps for later walks (a few MiB each): more passes at once than this (a
# threaded sweep's children) make theirs and leave them to the garbage collector, so a long-lived
# process (the warm runner) does not hold one per thread it ever ran
KEPT_WORKSPACES = 4


@contextlib.contextmanager
def _workspace() -> Iterator[Workspace]:
    with _WORKSPACES_LOCK:
        workspace = _WORKSPACES.pop() if _WORKSPACES else Workspace()
    try:
        yield workspace
    finally:
        with _WORKSPACES_LOCK:
            if len(_WORKSPACES) < KEPT_WORKSPACES:
                _WORKSPACES.append(workspace)


class VectorisedNumPy:
    """NumPy for the CPU's passes over the data (the `xp` of a fused pass's sums), with torch's
    vectorised log, log1p and exp in the calling thread (see `_in_calling_thread`) if `vectorised`:
    NumPy's are scalar without AVX-512, and on one thread torch's made a Student-t fit at 1e5 15%
    faster and a Weibull fit at 1e6 20%. Walks long enough for two threads keep NumPy's: torch's
    vectorised kernels in two threads at once ran slower here than in one (the Weibull at 1e6: 83
    ms against 63), NumPy's scale. `scratch` gives the temporaries from a workspace."""

    def __init__(self, workspace: Workspace, vectorised: bool):
        self._workspace = workspace
        if vectorised:
            self.log, self.log1p, self.exp = VECTORISED["log"], VECTORISED["log1p"], VECTORISED["exp"]

    def scratch(self, slot: int, *operands: np.ndarray) -> np.ndarray:
        """Workspace array `slot`, in the shape and dtype of the operands broadcast together."""
        shape = operands[0].shape
        for operand in operands[1:]:
            if operand.shape != shape:  # (np.broadcast_shapes costs 2 µs, a few times a chunk)
                shape = np.broadcast_shapes(shape, operand.shape)
        return self._workspace.array(slot, shape, np.result_type(*operands))

    def log_sum(self, u: np.ndarray, w: np.ndarray | None, slot: int) -> np.ndarray:
        """Σ w log u over the last dimension, kept as (..., 1), for u >= 1; `slot` is a free
        workspace slot. Without weights, as the logarithms of products of LOG_GROUP values (one
        logarithm per LOG_GROUP elements; none of the products underflows): each product rounds
        once more than a logarithm would, an absolute error of a few units in the last place of 1
        per group, where log1p would keep the digits of values near 1 (see the Student-t pass).
        Where a product overflows (values above 1e38), the logarithms one by one."""
        body = u.shape[-1] - u.shape[-1] % LOG_GROUP
        if w is None and body:
            # (a view: the last dimension split into LOG_GROUP contiguous runs)
            runs = u[..., :body].reshape(*u.shape[:-1], LOG_GROUP, body // LOG_GROUP)
            with np.errstate(over="ignore"):  # (an overflow is caught below)
                product = np.multiply(runs[..., 0, :], runs[..., 1, :], out=self.scratch(slot, runs[..., 0, :]))
                for k in range(2, LOG_GROUP):
                    product *= runs[..., k, :]
            total = self.log(product, out=product).sum(-1, keepdims=True)
            if body < u.shape[-1]:
                rest = u[..., body:]
                total += self.log(rest, out=self.scratch(slot, rest)).sum(-1, keepdims=True)
            if np.isfinite(total).all():
                return total
        return weighted_sum(self.log(u, out=self.scratch(slot, u)), w)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class TorchMath:
    """torch as the `xp` of a fused pass's sums on CUDA, where the caching allocator makes
    temporaries cheap: `scratch` is a new tensor."""

    @staticmethod
    def scratch(slot: int, *operands: Tensor) -> Tensor:
        shape = torch.broadcast_shapes(*(o.shape for o in operands))
        return torch.empty(shape, dtype=operands[0].dtype, device=operands[0].device)

    @staticmethod
    def log_sum(u: Tensor, w: Tensor | None, slot: int) -> Tensor:
        """Σ w log u over the last dimension, kept as (..., 1) (see VectorisedNumPy.log_sum: on
        CUDA the pass is bound by memory, not by the logarithms)."""
        return weighted_sum(torch.log(u), w)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# (x, out) -> f(x), written into `out` (an array of x's shape) where that saves an allocation
CPU_TRANSFORMS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "x": lambda x, out: x,
    "log": VECTORISED["log"],
    "log1m": lambda x, out: VECTORISED["log1p"](np.negative(x, out=out), out=out),
    "lgamma1p": _in_calling_thread(lambda x, out: torch.lgamma(x + 1, out=out)),
}


@dataclass(frozen=True)
class Moments:
    """Weighted moments of f(x) over the last dimension, kept as (..., 1): `total` Σw, the mean
    Σw f / Σw as `shift` (the mean of the first chunk of data) + `centre`, and `m2` Σw (f - mean)².
    Centred, and relative to a value near the mean, so no digits are lost to cancellation when the
    data sit far from zero (mean - μ is computed as (shift - μ) + centre, exact in its first part)."""

    total: Tensor
    shift: Tensor
    centre: Tensor
    m2: Tensor

    @property
    def mean(self) -> Tensor:
        return self.shift + self.centre

    @property
    def sum(self) -> Tensor:
        return self.total * self.mean

    @property
    def std(self) -> Tensor:
        """The weighted standard deviation, Σw (f - mean)² / Σw under the root (the MLE's)."""
        return (self.m2 / self.total).sqrt()

    def squares_about(self, point: Tensor) -> Tensor:
        """Σw (f - point)²."""
        return self.m2 + self.total * ((self.shift - point) + self.centre) ** 2


class ExactData:
    """The exact part of a set of observations, with its statistics cache (a dict owned by the
    Observations object, so statistics are computed once per data set, not once per step). Start
    rules read it too: `moments`, `min`, `max` and the `values` themselves."""

    def __init__(self, values: Tensor, weights: Tensor | None, cache: dict):
        self.values, self.weights, self.cache = values, weights, cache

    @property
    def size(self) -> int:
        return self.values.shape[-1]

    def chunks(self, batch: tuple[int, ...] = (), cpu_budget: int | None = None) -> list[tuple[Tensor, Tensor | None]]:
        """Views of the data in chunks of about CPU_CHUNK (`cpu_budget`) or CUDA_CHUNK elements
        each, counting the rows of a batch (`batch`: the parameters' batch shape) that every chunk
        is broadcast against."""
        shapes = [self.values.shape[:-1], batch] + ([] if self.weights is None else [self.weights.shape[:-1]])
        rows = math.prod(max(sizes) for sizes in itertools.zip_longest(*(s[::-1] for s in shapes), fillvalue=1))
        budget = CUDA_CHUNK if self.values.device.type == "cuda" else cpu_budget or CPU_CHUNK
        step = max(1024, budget // rows)
        return [
            (self.values[..., s : s + step], None if self.weights is None else self.weights[..., s : s + step])
            for s in range(0, self.size, step)
        ]

    def prepare(self, transforms: Sequence[str], with_range: bool = False) -> None:
        """The weighted moments of each of `transforms` (names in TRANSFORMS) not cached yet, and
        the data's range if `with_range` (and not cached yet), in one walk over the data: a family
        reads them all, so a fit of a family with sufficient statistics reads its data once. Each
        chunk's moments are taken about a common shift (the first chunk's mean), then merged with
        the parallel update of Chan et al. (stable for data far from zero). On the CPU the walk runs
        in NumPy (see CPU_TRANSFORMS)."""
        wanted = [t for t in dict.fromkeys(transforms) if t not in self.cache]
        with_range = with_range and "range" not in self.cache
        if not (wanted or with_range) or not self.size:
            return
        chunks = self.chunks(cpu_budget=MOMENT_CHUNK)
        cpu = self.values.device.type == "cpu"
        table = CPU_TRANSFORMS if cpu else TRANSFORMS
        functions = [table[t] for t in wanted]
        if cpu:  # views of the same memory
            chunks = [(x.detach().numpy(), None if w is None else w.detach().numpy()) for x, w in chunks]
        # the shift of each transform: its first chunk's mean, so every later chunk's sums are taken
        # about a value near its own mean, where Σd² - (Σd)²/n loses no digits
        shifts: list = [None] * len(wanted)
        # each chunk's total weight, and per transform its Σw d and Σw d² (d = f - shift), kept in
        # lists of small arrays; the centres and m2s follow from them after the walk, for all chunks
        # at once (a few small operations per chunk fewer)
        chunk_totals: list = []
        parts: list[list] = [[] for _ in wanted]
        low = high = None
        with _workspace() if cpu else contextlib.nullcontext() as workspace:
            for x, w in chunks:
                self._walk_chunk(x, w, functions, workspace, shifts, chunk_totals, parts)
                if with_range:
                    low = x.min() if low is None else min(low, x.min())
                    high = x.max() if high is None else max(high, x.max())

        def tensor(value) -> Tensor:
            return torch.as_tensor(value, dtype=self.values.dtype, device=self.values.device)

        # the chunks' moments merged in the walk's own arrays (on the CPU, NumPy's operations on
        # a few values cost a fraction of torch's), made tensors at the end
        stack = np.stack if cpu else torch.stack
        totals = stack(chunk_totals)
        for j, transform in enumerate(wanted):
            sums, squares = (stack(p) for p in zip(*parts[j], strict=True))
            centres = sums / (totals + (totals == 0))  # a chunk of zero weights has sums 0, not NaN
            merged = _merge(totals, shifts[j], centres, squares - totals * centres * centres)
            self.cache[transform] = Moments(*(tensor(value) for value in merged))
        if with_range:
            self.cache["range"] = (tensor(low), tensor(high))

    @staticmethod
    def _walk_chunk(
        x: Any, w: Any, functions: list, workspace: Workspace | None, shifts: list, chunk_totals: list, parts: list
    ) -> None:
        """One chunk's total weight, and per transform its Σw d and Σw d² about the shift (see
        `prepare`); on the CPU, temporaries in `workspace`."""
        total = x[..., :1] * 0 + x.shape[-1] if w is None else w.sum(-1, keepdims=True)
        chunk_totals.append(total)
        for j, f in enumerate(functions):
            fx = f(x, workspace.array(0, x.shape, x.dtype)) if workspace is not None else f(x)
            raw = _raw_moments(fx) if workspace is not None and w is None else None
            if shifts[j] is None:
                shifts[j] = raw[0] / total if raw is not None else weighted_sum(fx, w) / (total + (total == 0))
            if raw is not None:
                # well conditioned: Σd and Σd² about the shift follow from Σf and the chunk's m2
                # without a pass over d
                centred = raw[0] - total * shifts[j]
                parts[j].append((centred, raw[1] + centred * centred / total))
                continue
            # (a new array: batched weights broadcast it to their rows)
            if workspace is not None:
                shape = np.broadcast_shapes(fx.shape, shifts[j].shape)
                d = np.subtract(fx, shifts[j], out=workspace.array(1, shape, fx.dtype))
            else:
                d = fx - shifts[j]
            parts[j].append((weighted_sum(d, w), weighted_squares(d, w)))

    def moments(self, transform: str) -> Moments:
        """Weighted moments of TRANSFORMS[transform](x) (see `prepare`)."""
        if transform not in self.cache:
            self.prepare([transform])
        return self.cache[transform]

    @property
    def total(self) -> Tensor:
        return self.moments("x").total

    @property
    def min(self) -> Tensor:
        self.prepare((), with_range=True)
        return self.cache["range"][0]

    @property
    def max(self) -> Tensor:
        self.prepare((), with_range=True)
        return self.cache["range"][1]


def _each_chunk(count: int, work: Callable[[int, VectorisedNumPy], None]) -> None:
    """`work(i, xp)` for i in range(count), `xp` a VectorisedNumPy on a workspace of the thread's
    own. With enough chunks, split into contiguous ranges over torch's intra-op thread count, one
    of them in this thread. NumPy's kernels release the GIL, and unlike an OpenMP region per
    operation, whose barrier waits at every operation for a thread that a busy machine
    descheduled, the threads meet once, at the end. (The moment pass of `prepare` stays in one
    thread: there two made the gamma and lognormal fits at 1e6 slower, its torch logs in small
    pieces contending for the GIL.)"""
    # the functions depend on the chunks alone, never on the thread count, so the totals do not
    # either: torch's vectorised ones where the walk is too short to share, NumPy's where it can be
    # (see VectorisedNumPy)
    vectorised = count < 2 * MIN_CHUNKS_PER_THREAD
    workers = min(torch.get_num_threads(), count // MIN_CHUNKS_PER_THREAD)
    failures: list[BaseException] = []

    def run(start: int, stop: int) -> None:
        try:
            with _workspace() as workspace:
                xp = VectorisedNumPy(workspace, vectorised)
                for i in range(start, stop):
                    work(i, xp)
        except BaseException as error:  # raised again in the calling thread
            failures.append(error)

    if workers <= 1:
        run(0, count)
    else:
        bounds = [count * k // workers for k in range(workers + 1)]
        helpers = [threading.Thread(target=run, args=bounds[k : k + 2], daemon=True) for k in range(1, workers)]
        for helper in helpers:
            helper.start()
        run(bounds[0], bounds[1])
        for helper in helpers:
            helper.join()
    if failures:
        raise failures[0]


def _merge(totals: Any, shift: Any, centres: Any, m2s: Any) -> tuple[Any, Any, Any, Any]:
    """The chunks' moments (stacked along the first dimension) about a common shift, as one:
    total, shift, centre and m2 (see Moments), in the arrays' own kind (NumPy's or torch's)."""
    total = totals.sum(0)
    centre = (totals * centres).sum(0) / (total + (total == 0))
    return total, shift, centre, m2s.sum(0) + (totals * (centres - centre) ** 2).sum(0)


def weighted_sum(t: Tensor, w: Tensor | None) -> Tensor:
    """Σ w t over the last dimension, kept as (..., 1); without a temporary for one data set. The
    same on NumPy arrays (the CPU's moment walk): only the operations both have."""
    if w is None:
        return t.sum(-1, keepdims=True)
    if t.ndim == 1 and w.ndim == 1:
        return (t @ w).reshape(1)
    if w.ndim == 1:
        return (t @ w)[..., None]
    if t.ndim == 1:
        return (w @ t)[..., None]
    return (w * t).sum(-1, keepdims=True)


def _raw_moments(f: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Σf and Σ(f - mean)² of a 1-D float64 chunk as (1,) arrays, from Σf and Σf² (two reads, no
    temporary), or None where Σf² - (Σf)²/n would lose more than four bits to cancellation (data
    far from zero relative to their spread, constant data): then the caller centres the chunk.
    Σf² is BLAS dots of DOT_PIECE elements, which OpenBLAS runs in the calling thread: one stacked
    matmul of the pieces as (1, DOT_PIECE) by (DOT_PIECE, 1) (a Python loop of dots took twice as
    long), and one dot of the rest."""
    if f.ndim != 1 or f.dtype != np.float64 or not f.size:
        return None
    total = f.sum()
    body = f.size - f.size % DOT_PIECE
    pieces = f[:body]
    squares = np.matmul(pieces.reshape(-1, 1, DOT_PIECE), pieces.reshape(-1, DOT_PIECE, 1)).sum()
    squares += np.dot(f[body:], f[body:])
    m2 = squares - total * total / f.size
    if not m2 * 16 >= squares or m2 == 0:  # (NaN or inf data: the centred path gives them)
        return None
    return np.reshape(total, (1,)), np.reshape(m2, (1,))


def weighted_squares(d: Any, w: Any) -> Any:
    """Σ w d² over the last dimension, kept as (..., 1); `d` may be overwritten. Not a BLAS dot of
    the whole chunk: OpenBLAS threads would wait on each other too (see DOT_PIECE). Without
    weights, NumPy's einsum reads float64 `d` once and writes nothing (in float32 its running sums
    would lose the digits that the pairwise sum keeps)."""
    if w is None and isinstance(d, np.ndarray) and d.dtype == np.float64:
        return np.einsum("...i,...i->...", d, d)[..., None]
    d *= d
    return weighted_sum(d, w)


# (x chunk, w chunk, parameters, gradient wanted, array module) -> the chunk's sums, each (..., 1):
# written with the operations NumPy arrays and torch tensors share, and `xp`'s functions
# (VectorisedNumPy on the CPU, TorchMath on CUDA)
ChunkSums = Callable[[Tensor, Tensor | None, Sequence[Tensor], bool, Any], list[Tensor]]
# (data, the sums added up, parameters, gradient wanted) -> (total, its gradient in each parameter)
Finish = Callable[[ExactData, list[Tensor], Sequence[Tensor], bool], tuple[Tensor, list[Tensor]]]


@dataclass(frozen=True)
class FusedPass:
    """A family's fused pass: the per-chunk sums and how the total and gradient follow from them.
    Calling it gives the total log-likelihood (kept as (..., 1)) of a family's likelihood rule."""

    sums: ChunkSums
    finish: Finish

    def run(self, data: ExactData, params: Sequence[Tensor], gradient: bool) -> tuple[Tensor, list[Tensor]]:
        cpu = data.values.device.type == "cpu"
        given = [p.detach().numpy() if cpu else p.detach() for p in params]
        chunks = data.chunks(max((p.shape[:-1] for p in params), key=len))
        # each chunk's sums in its own slot, added up in the chunks' order after the walk: the same
        # totals, bit for bit, whatever the number of threads
        parts: list = [None] * len(chunks)

        def walk(i: int, xp: Any) -> None:
            x, w = chunks[i]
            if cpu:  # views of the same memory
                x, w = x.numpy(), None if w is None else w.numpy()
            parts[i] = self.sums(x, w, given, gradient, xp)

        if cpu:
            _each_chunk(len(chunks), walk)
        else:  # CUDA kernels run asynchronously already
            xp = TorchMath()
            for i in range(len(chunks)):
                walk(i, xp)
        added = [p * 1 for p in parts[0]]  # copies, added to in place
        for part in parts[1:]:
            for a, b in zip(added, part, strict=True):
                a += b
        sums = [torch.as_tensor(a, dtype=data.values.dtype, device=data.values.device) for a in added]
        return self.finish(data, sums, params, gradient)

    def __call__(self, data: ExactData, family: Family, params: Mapping[str, Tensor]) -> Tensor:
        ordered = [params[name] for name in family.params]
        if torch.is_grad_enabled() and any(p.requires_grad for p in ordered):
            return _FusedTotal.apply(family, data, self, *ordered).unsqueeze(-1)
        # no gradient wanted (a line search's trial point, a held-out NLL): the value's sums alone
        return self.run(data, ordered, gradient=False)[0]


class _FusedTotal(Function):
    """The total log-likelihood with its gradient computed in the same pass.
    Inputs: (family, data, fused pass, *params in the family's order)."""

    @staticmethod
    def forward(ctx, family: Family, data: ExactData, fused: FusedPass, *params: Tensor) -> Tensor:
        total, gradients = fused.run(data, params, gradient=True)
        ctx.family, ctx.data, ctx.gradients = family, data, gradients
        ctx.save_for_backward(*params)
        return total.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        params = ctx.saved_tensors
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[3:]) if needed]
        grads: list[Tensor | None] = [None] * len(params)
        if torch.is_grad_enabled():
            # a graph of the gradient is asked for (create_graph: Hessians): through torch's
            # log_prob, whose second derivatives are exact
            total = _generic_total(ctx.family, ctx.data, params)
            found = torch.autograd.grad(
                total, [params[i] for i in wanted], grad_output, create_graph=True, allow_unused=True
            )
            for i, g in zip(wanted, found, strict=False):
                grads[i] = g if g is not None else torch.zeros_like(params[i])
        else:
            for i in wanted:
                grads[i] = _sum_to(grad_output.unsqueeze(-1) * ctx.gradients[i], params[i].shape)
        return (None, None, None, *grads)


def _generic_total(family: Family, data: ExactData, params: Sequence[Tensor]) -> Tensor:
    dist = family.build(**dict(zip(family.params, params, strict=False)), validate_args=False)
    log_density = dist.log_prob(data.values)
    if data.weights is not None:
        log_density = data.weights * log_density
    return log_density.sum(-1)


def _sum_to(gradient: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient to a parameter's own shape."""
    while gradient.dim() > len(shape):
        gradient = gradient.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and gradient.shape[dim] != 1:
            gradient = gradient.sum(dim, keepdim=True)
    return gradient
