"""What both compiled threshold kernels (search_shared, search_per_exit) share: one configuration's mIoU from its
exact integer counts, the Pareto pre-filter, the output buffer, and its rows. The kernels add a configuration's
costs to its prefix's in the order of search._cost_sum (ints for MACs, float64 for latencies).

Compiled with numba (`cache=True`: Ray workers load the machine code instead of compiling it again; numba's
cache tracks a kernel's own file only, so after editing this module delete messearch/__pycache__/*.nb[ic]),
without numba's reference counting (`_nrt=False`: the kernels allocate nothing, and every array passed to a
helper would otherwise cost two atomic operations per call, per configuration). No
fastmath: every float operation runs as written, in IEEE order, so the kernel's mIoU and costs are the floats
numpy computes from the same integers (metrics.miou_from_counts, search._cost_sum; tests/test_search checks).
The cache's rows are int32 where every sum of them fits (search.prepare), padded to a multiple of 16 columns
(whole SIMD vectors: measured faster than the odd width, 2 x classes + 1). What runs per configuration (costs, mIoU,
the pre-filter) is inlined: a call passes every array as a struct of seven words. Two intrinsics emit what numba's
plain loops did not: a row's difference-array update in whole vectors (add_sub_row), and its prefetch.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import metrics
from .config import KIND_CASCADE

JIT = dict(cache=True, nogil=True, _nrt=False)
OUT_ROWS = 1 << 15       # rows of the output buffer: a kernel pauses when the next step could overflow it
STAIR_POINTS = 1 << 14   # two objectives: the pre-filter's staircase of non-dominated points
ELITE_POINTS = 32        # more objectives: the last emitted points, a ring


@nb.njit(inline="always", **JIT)   # per configuration, as keep: inlined, 10% less of the shared search (A/B)
def miou_of(cnt, gt):
    """metrics.miou_from_counts of one configuration's counts cnt [W] (tp, pred, ...), in the same float steps."""
    c = gt.shape[0]
    total = 0.0
    present = 0
    for k in range(c):
        union = (gt[k] + cnt[c + k]) - cnt[k]
        if union > 0:
            total = total + np.float64(cnt[k]) / np.float64(union)
            present += 1
    if present > 0:
        return total / np.float64(present)
    return 0.0


def _row_pointer(context, builder, aryty, value, inds):
    """LLVM pointer to the first element of a row of an array (inds: every index but the last; no wraparound)."""
    i64 = ir.IntType(64)
    ary = context.make_array(aryty)(context, builder, value)
    inds = [builder.sext(a, i64) if a.type.width < 64 else a for a in inds] + [ir.Constant(i64, 0)]
    ptr = cgutils.get_item_pointer2(context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
                                    strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
                                    inds=inds, wraparound=False)
    return ptr, cgutils.unpack_tuple(builder, ary.shape)[-1]


@intrinsic
def add_sub_row(typingctx, diff, lo, hi, x, c, i):
    """diff[lo] += x[c, i]; diff[hi] -= x[c, i] (C-contiguous diff [S, W] and x [E, N, W] of one integer type, W a
    whole number of 32-byte vectors), one vector at a time. The plain loop compiled to the same vector operations
    behind per-image overlap checks and index arithmetic: this took 8% less of the shared search (same-run A/B)."""
    if diff.layout != "C" or x.layout != "C" or diff.dtype != x.dtype or (diff.ndim, x.ndim) != (2, 3):
        raise nb.core.errors.TypingError("add_sub_row: C-contiguous 2-d and 3-d arrays of one type")

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        p_lo, width = _row_pointer(context, builder, signature.args[0], args[0], [args[1]])
        p_hi, _ = _row_pointer(context, builder, signature.args[0], args[0], [args[2]])
        p_x, _ = _row_pointer(context, builder, signature.args[3], args[3], [args[4], args[5]])
        elt = context.get_value_type(diff.dtype)
        lanes = 32 // (elt.width // 8)
        vptr = ir.VectorType(elt, lanes).as_pointer()
        with cgutils.for_range(builder, builder.udiv(width, ir.Constant(i64, lanes))) as loop:
            off = builder.mul(loop.index, ir.Constant(i64, lanes))
            v_x, v_lo, v_hi = (builder.bitcast(builder.gep(p, [off]), vptr) for p in (p_x, p_lo, p_hi))
            v = builder.load(v_x, align=4)
            builder.store(builder.add(builder.load(v_lo, align=4), v), v_lo, align=4)
            builder.store(builder.sub(builder.load(v_hi, align=4), v), v_hi, align=4)
        return context.get_dummy_value()
    return types.void(diff, lo, hi, x, c, i), codegen


@intrinsic
def prefetch_row(typingctx, x, c, i):
    """Ask the CPU to fetch every 64-byte line of the row x[c, i] (C-contiguous, 3-d) ahead of its use: the kernels
    read image rows in an order no hardware prefetcher follows."""
    def codegen(context, builder, signature, args):
        i64, i8p, i32 = ir.IntType(64), ir.IntType(8).as_pointer(), ir.IntType(32)
        ptr, width = _row_pointer(context, builder, signature.args[0], args[0], args[1:])
        nbytes = builder.mul(width, ir.Constant(i64, context.get_abi_sizeof(context.get_data_type(x.dtype))))
        lines = builder.udiv(builder.add(nbytes, ir.Constant(i64, 63)), ir.Constant(i64, 64))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        base = builder.bitcast(ptr, i8p)
        with cgutils.for_range(builder, lines) as loop:
            at = builder.gep(base, [builder.mul(loop.index, ir.Constant(i64, 64))])
            builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(x, c, i), codegen


@nb.njit(inline="always", **JIT)   # per configuration: a call with its array views cost 18-28% (A/B)
def costs(model, c, h, nat, nf, a_prefix, al_prefix, hl_c, lat, al_out):
    """A configuration whose last exit c (heads' MACs h, latencies per device hl_c, each summed along it) takes nat
    images and sends nf on to the final head, after a prefix of MAC sum a_prefix and latency sums al_prefix:
    (its prefix MAC sum with c, its MAC sum); its latency sums in lat, the prefix's with c in al_out. In the order
    of search._cost_sum."""
    mbb, mk, lbb, lk = model[2], model[4], model[5], model[7]
    a = a_prefix + nat * (mbb[c] + h)
    for d in range(lat.shape[0]):
        ad = al_prefix[d] + np.float64(nat) * (lbb[d, c] + hl_c[d])
        al_out[d] = ad
        lat[d] = ad + np.float64(nf) * ((lk[d, 0] + hl_c[d]) + lk[d, 1])
    return a, a + nf * ((mk[0] + h) + mk[1])


@nb.njit(inline="always", **JIT)
def _dominated(obj, pf, stair, elite):
    """Whether an already emitted configuration strictly dominates obj (objectives to minimise)."""
    d = obj.shape[0]
    if d == 2:
        # stair: gmacs ascending, -miou strictly descending; the best -miou at gmacs <= x is the last such point
        x, y = obj[1], obj[0]
        lo, hi = 0, pf[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if stair[0, mid] <= x:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return False
        fy = stair[1, lo - 1]
        return fy < y or (fy == y and stair[0, lo - 1] < x)
    for q in range(pf[1]):
        le = True
        lt = False
        for m in range(d):
            if elite[q, m] > obj[m]:
                le = False
                break
            if elite[q, m] < obj[m]:
                lt = True
        if le and lt:
            return True
    return False


@nb.njit(**JIT)
def _remember(obj, pf, stair, elite):
    """Add a non-dominated obj to the pre-filter (staircase: drop the points it dominates; ring: overwrite)."""
    d = obj.shape[0]
    if d != 2:
        q = pf[2]
        for m in range(d):
            elite[q, m] = obj[m]
        pf[2] = (q + 1) % elite.shape[0]
        pf[1] = min(pf[1] + 1, elite.shape[0])
        return
    x, y = obj[1], obj[0]
    n = pf[0]
    lo = 0
    while lo < n and stair[0, lo] < x:   # staircases stay short; a scan beats bookkeeping here
        lo += 1
    hi = lo
    while hi < n and stair[1, hi] >= y:
        hi += 1
    new_n = n - (hi - lo) + 1
    if new_n > stair.shape[1]:
        return   # full: a weaker pre-filter, never a wrong one
    shift = lo + 1 - hi   # the points from hi on move by shift (they overlap: copy away from the move)
    if shift > 0:
        for q in range(n - 1, hi - 1, -1):
            stair[0, q + shift], stair[1, q + shift] = stair[0, q], stair[1, q]
    elif shift < 0:
        for q in range(hi, n):
            stair[0, q + shift], stair[1, q + shift] = stair[0, q], stair[1, q]
    stair[0, lo] = x
    stair[1, lo] = y
    pf[0] = new_n


@nb.njit(inline="always", **JIT)
def keep(miou, macsum, lat, n, emit_all, pf, stair, elite, obj):
    """Whether a configuration goes to the output: always with emit_all, else unless an emitted one dominates it
    (then it is remembered for the next ones). Objectives as the front's: -mIoU, mean GMACs, mean latencies."""
    if emit_all:
        return True
    obj[0] = -miou
    obj[1] = np.float64(macsum) / np.float64(n) / 1e9
    for d in range(lat.shape[0]):
        obj[2 + d] = lat[d] / np.float64(n)
    if _dominated(obj, pf, stair, elite):
        return False
    _remember(obj, pf, stair, elite)
    return True


@nb.njit(**JIT)
def next_exit(ist, cur, j, first_end, n_exit, steps, cap):
    """One step of a kernel's depth-first walk at depth j: the next exit to add there (cur[j] advanced), or -1 to
    return (done, ist[6] = 1; or paused: the next exit's `steps` rows could overflow the buffer of `cap`), or -2
    when depth j has no exit left (the walk goes up: ist[0] = j - 1). Depth 0 tries exits below first_end."""
    c = cur[j]
    if c >= (first_end if j == 0 else n_exit):
        if j == 0:
            ist[6] = 1
            return -1
        ist[0] = j - 1
        return -2
    if ist[1] + steps > cap:
        return -1
    cur[j] = c + 1
    return c


@nb.njit(**JIT)
def write(out, ist, ex, st, na, k, cnt, macsum, lat, miou):
    """Append one configuration (exits ex[:k], threshold steps st[:k], images leaving na[:k], counts cnt) to out."""
    o_ex, o_st, o_na, o_cnt, o_mac, o_lat, o_miou = out
    r = ist[1]
    ist[1] = r + 1
    for j in range(o_ex.shape[1]):
        o_ex[r, j] = ex[j] if j < k else -1
        o_st[r, j] = st[j] if j < k else -1
        o_na[r, j] = na[j] if j < k else 0
    for m in range(o_cnt.shape[1]):
        o_cnt[r, m] = cnt[m]
    o_mac[r] = macsum
    for d in range(lat.shape[0]):
        o_lat[r, d] = lat[d]
    o_miou[r] = miou


# ------------------------------------------------------------------------------------------ the Python side

def model_of(prep) -> tuple:
    """The kernel's view of a Prepared: (n, gt, MAC backbone-to and head [E] with (total, final), latency tables
    [D, E] twice and [D, 2])."""
    bb, hd, tot, fin = prep.costs["macs"]
    lat = [prep.costs[f"lat:{d}"] for d in prep.devices]
    e, d = prep.n_exits, len(lat)
    lbb = np.array([t[0] for t in lat], dtype=np.float64).reshape(d, e)
    lhd = np.array([t[1] for t in lat], dtype=np.float64).reshape(d, e)
    lk = np.array([[t[2], t[3]] for t in lat], dtype=np.float64).reshape(d, 2)
    return (np.int64(prep.n), prep.gt.astype(np.int64), np.asarray(bb, np.int64), np.asarray(hd, np.int64),
            np.array([tot, fin], dtype=np.int64), lbb, lhd, lk)


class Output:
    """The output buffer of the kernels and the pre-filter state that lives across a shard's trees."""

    def __init__(self, prep, rows: int | None = None, emit_all: bool = False):
        k, w, d = prep.max_exits, prep.width, len(prep.devices)
        cap = max(rows or OUT_ROWS, len(prep.thresholds))   # a kernel's step writes at most T rows
        self.arrays = (np.empty((cap, k), np.int64), np.empty((cap, k), np.int64), np.empty((cap, k), np.int64),
                       np.empty((cap, w), np.int64), np.empty(cap, np.int64), np.empty((cap, d)), np.empty(cap))
        self.emit_all = bool(emit_all)
        self.pf = np.zeros(3, np.int64)    # staircase length, ring length, ring position
        self.stair = np.empty((2, STAIR_POINTS))
        self.elite = np.empty((ELITE_POINTS, 2 + d))
        self.scratch = (np.empty(2 + d), np.empty(d))

    def rows(self, prep, m: int, tree_t: np.ndarray) -> dict:
        """The first m rows written, as search rows (the form search.block_metrics returns); mIoU through
        metrics.miou_from_counts, which must equal the kernel's float for float."""
        o_ex, o_st, o_na, o_cnt, o_mac, o_lat, o_miou = (a[:m] for a in self.arrays)
        c = prep.n_classes
        tp = o_cnt[:, :c]
        miou = metrics.miou_from_counts(tp, o_cnt[:, c:2 * c], prep.gt)
        if not np.array_equal(miou, o_miou):
            raise AssertionError("the compiled kernel's mIoU differs from metrics.miou_from_counts")
        rows = {
            "kind": np.full(m, KIND_CASCADE, dtype=np.int8), "n_exits": (o_ex >= 0).sum(axis=1).astype(np.int8),
            "exits": o_ex.copy(), "tidx": np.where(o_st >= 0, tree_t[np.maximum(o_st, 0)], -1),
            "n_at": o_na.copy(), "n_final": prep.n - o_cnt[:, -1], "miou": miou,
            "pixel_acc": metrics.pixel_accuracy(tp, prep.gt), "macsum": o_mac.copy(),
        }
        rows["mean_gmacs"] = rows["macsum"] / prep.n / 1e9
        for i, dev in enumerate(prep.devices):
            rows[f"lat_{dev}"] = o_lat[:, i] / prep.n
        return rows


def run(prep, kernel, args: tuple, ist: np.ndarray, sink, tree_t: np.ndarray) -> None:
    """Call a tree kernel until it is done (ist[6]), handing each buffer of rows and the count it evaluated to
    sink.take."""
    out = sink.output(prep)
    obj, lat = out.scratch
    while True:
        ist[1] = ist[2] = 0
        kernel(*args, out.arrays, out.emit_all, out.pf, out.stair, out.elite, obj, lat, ist)
        sink.take(out.rows(prep, int(ist[1]), tree_t), int(ist[2]))
        if ist[6]:
            return
