//! The CPU path of the cosine ops: rows read as slices (gathered when strided),
//! in parallel with rayon once there is enough work.

use super::*;

/// The rows of an `[N,H]` CPU input, each read as a slice: borrowed when the row
/// is unit-stride, else gathered into a row-sized scratch buffer.
pub(super) struct Rows<'a, T> {
    data: &'a [T],
    view: View<2>,
}

impl<'a, T: Copy> Rows<'a, T> {
    pub(super) fn new(data: &'a [T], view: View<2>) -> Self {
        Self { data, view }
    }

    fn count(&self) -> usize {
        self.view.dims[0]
    }

    fn len(&self) -> usize {
        self.view.dims[1]
    }

    #[inline(always)]
    fn row<'s>(&'s self, i: usize, scratch: &'s mut Vec<T>) -> &'s [T] {
        let (start, h) = (self.view.at([i, 0]), self.len());
        if self.view.rows_contiguous() {
            return &self.data[start..start + h];
        }
        let step = self.view.strides[1];
        scratch.clear();
        scratch.extend((0..h).map(|j| self.data[start + j * step]));
        scratch
    }
}

/// Below this many input elements the rows run on the calling thread: handing
/// them to rayon costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// Independent partial sums per reduction, so the inner loops vectorise.
const LANES: usize = 8;

type Acc<T> = <T as FloatElem>::Acc;

/// Scratch rows for strided inputs, one set per rayon job.
struct Scratch<T> {
    x: Vec<T>,
    y: Vec<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            x: Vec::new(),
            y: Vec::new(),
        }
    }
}

/// Runs `f(scratch, i, out_row)` for every output row of length `row_len`,
/// in parallel when `work` (input elements) is large enough.
fn for_each_row<T, F>(out: &mut [T], row_len: usize, work: usize, f: F)
where
    T: Send,
    F: Fn(&mut Scratch<T>, usize, &mut [T]) + Sync + Send,
{
    if row_len == 0 {
        return;
    }
    if work >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each_init(Scratch::default, |s, (i, row)| f(s, i, row));
    } else {
        let mut s = Scratch::default();
        for (i, row) in out.chunks_mut(row_len).enumerate() {
            f(&mut s, i, row);
        }
    }
}

/// `[Σx·y, Σx², Σy²]` in the accumulator type: three single-sum loops over
/// the (cache-resident) rows, each of which vectorises; one loop with three
/// sums did not.
fn dots<T: FloatElem>(x: &[T], y: &[T]) -> [Acc<T>; 3] {
    [dot(x, y), sum_sq(x), sum_sq(y)]
}

/// `Σx·y` in the accumulator type.
#[allow(clippy::needless_range_loop)]
fn dot<T: FloatElem>(x: &[T], y: &[T]) -> Acc<T> {
    let mut xy = [Acc::<T>::zero(); LANES];
    let (xs, ys) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail = xs.remainder().iter().zip(ys.remainder());
    for (xc, yc) in xs.zip(ys) {
        for k in 0..LANES {
            xy[k] += xc[k].to_acc() * yc[k].to_acc();
        }
    }
    let mut sum: Acc<T> = xy.into_iter().sum();
    for (u, v) in tail {
        sum += u.to_acc() * v.to_acc();
    }
    sum
}

/// `Σx²` in the accumulator type.
#[allow(clippy::needless_range_loop)]
fn sum_sq<T: FloatElem>(x: &[T]) -> Acc<T> {
    let mut xx = [Acc::<T>::zero(); LANES];
    let xs = x.chunks_exact(LANES);
    let tail = xs.remainder();
    for xc in xs {
        for k in 0..LANES {
            let u = xc[k].to_acc();
            xx[k] += u * u;
        }
    }
    let mut sum: Acc<T> = xx.into_iter().sum();
    for u in tail {
        sum += u.to_acc() * u.to_acc();
    }
    sum
}

/// `out = alpha·x + beta·y`, element-wise.
fn axpby<T: FloatElem>(out: &mut [T], alpha: Acc<T>, x: &[T], beta: Acc<T>, y: &[T]) {
    for ((o, u), v) in out.iter_mut().zip(x).zip(y) {
        *o = T::from_acc(alpha * u.to_acc() + beta * v.to_acc());
    }
}

/// The norm of a row with squared norm `sq`, clamped: `(max(n, EPS), n >= EPS)`.
fn clamped_norm<A: Accum>(sq: A) -> (A, bool) {
    let (n, eps) = (sq.sqrt(), A::of(EPS));
    if n >= eps {
        (n, true)
    } else {
        (eps, false)
    }
}

pub(super) fn normalize<T: FloatElem>(x: &Rows<T>) -> Vec<T> {
    let (n, h) = (x.count(), x.len());
    // SAFETY: every row is written by for_each_row.
    let mut out = unsafe { output_buffer::<T>(n * h) };
    // Runs of rows per task, software-pipelined: row i is scaled in the
    // same loop that sums the squares of row i+1, so the loads from memory
    // never wait for a row's sum to finish.
    const RUN: usize = 32;
    let inv_norm = |row: &[T]| clamped_norm(sum_sq(row)).0.recip();
    for_each_row(&mut out, h * RUN, n * h, |s, run, y| {
        let first = run * RUN;
        let rows = first..first + y.len() / h;
        let mut inv = inv_norm(x.row(first, &mut s.x));
        for (i, y) in rows.clone().zip(y.chunks_exact_mut(h)) {
            let row = x.row(i, &mut s.x);
            if i + 1 < rows.end {
                let sq = scale_and_sum_sq(y, row, inv, x.row(i + 1, &mut s.y));
                inv = clamped_norm(sq).0.recip();
            } else {
                for (o, u) in y.iter_mut().zip(row) {
                    *o = T::from_acc(u.to_acc() * inv);
                }
            }
        }
    });
    out
}

/// `out = x·scale`, returning `Σnext²` (the next row's, loaded alongside).
#[allow(clippy::needless_range_loop)]
fn scale_and_sum_sq<T: FloatElem>(out: &mut [T], x: &[T], scale: Acc<T>, next: &[T]) -> Acc<T> {
    let mut sq = [Acc::<T>::zero(); LANES];
    let chunks = out
        .chunks_exact_mut(LANES)
        .zip(x.chunks_exact(LANES))
        .zip(next.chunks_exact(LANES));
    for ((o, u), v) in chunks {
        for k in 0..LANES {
            o[k] = T::from_acc(u[k].to_acc() * scale);
            let v = v[k].to_acc();
            sq[k] += v * v;
        }
    }
    // The tail after the lanes' total, as `sum_sq` adds them: equal rows get
    // bit-identical norms wherever they sit in a run.
    let mut sum: Acc<T> = sq.into_iter().sum();
    let tail = out.len() - out.len() % LANES;
    for ((o, u), v) in out[tail..].iter_mut().zip(&x[tail..]).zip(&next[tail..]) {
        *o = T::from_acc(u.to_acc() * scale);
        sum += v.to_acc() * v.to_acc();
    }
    sum
}

/// `dx = g/d − x·⟨x,g⟩/d³` with `d = ‖x‖` at or above the clamp, else `g/EPS`.
pub(super) fn normalize_backward<T: FloatElem>(x: &Rows<T>, g: &Rows<T>) -> Vec<T> {
    let (n, h) = (x.count(), x.len());
    // SAFETY: every row is written (axpby) by for_each_row.
    let mut out = unsafe { output_buffer::<T>(n * h) };
    for_each_row(&mut out, h, 2 * n * h, |s, i, dx| {
        let (xr, gr) = (x.row(i, &mut s.x), g.row(i, &mut s.y));
        let [xg, xx, _] = dots(xr, gr);
        let (d, unclamped) = clamped_norm(xx);
        let inv = d.recip();
        let k = if unclamped {
            xg * inv * inv * inv
        } else {
            Acc::<T>::zero()
        };
        axpby(dx, inv, gr, -k, xr);
    });
    out
}

pub(super) fn row_cosine<T: FloatElem>(a: &Rows<T>, b: &Rows<T>) -> Vec<T> {
    let (n, h) = (a.count(), a.len());
    // SAFETY: every row's cosine is written by for_each_row.
    let mut out = unsafe { output_buffer::<T>(n) };
    for_each_row(&mut out, 1, 2 * n * h, |s, i, cos| {
        let [ab, aa, bb] = dots(a.row(i, &mut s.x), b.row(i, &mut s.y));
        cos[0] = T::from_acc(ab / (clamped_norm(aa).0 * clamped_norm(bb).0));
    });
    out
}

/// `[da; db]` with, per row (`dₐ`, `d_b` the clamped norms, `c` the cosine):
/// `da = g/(dₐd_b)·b − [‖a‖≥EPS]·g·c/dₐ²·a`, and `db` symmetrically.
pub(super) fn row_cosine_backward<T: FloatElem>(
    a: &Rows<T>,
    b: &Rows<T>,
    grad: impl Fn(usize) -> T + Sync + Send,
) -> Vec<T> {
    let (n, h) = (a.count(), a.len());
    // SAFETY: every row of da and db is written (axpby) below.
    let mut out = unsafe { output_buffer::<T>(2 * n * h) };
    if h == 0 {
        return out;
    }
    let (da, db) = out.split_at_mut(n * h);
    let row = |s: &mut Scratch<T>, i: usize, da: &mut [T], db: &mut [T]| {
        let (ar, br) = (a.row(i, &mut s.x), b.row(i, &mut s.y));
        let [ab, aa, bb] = dots(ar, br);
        let ((na, a_unclamped), (nb, b_unclamped)) = (clamped_norm(aa), clamped_norm(bb));
        let g = grad(i).to_acc();
        let cross = g / (na * nb);
        let cos = ab / (na * nb);
        let zero = Acc::<T>::zero();
        let ka = if a_unclamped {
            g * cos / (na * na)
        } else {
            zero
        };
        let kb = if b_unclamped {
            g * cos / (nb * nb)
        } else {
            zero
        };
        axpby(da, cross, br, -ka, ar);
        axpby(db, cross, ar, -kb, br);
    };
    if 2 * n * h >= PARALLEL_MIN_ELEMS {
        da.par_chunks_mut(h)
            .zip(db.par_chunks_mut(h))
            .enumerate()
            .for_each_init(Scratch::default, |s, (i, (da, db))| row(s, i, da, db));
    } else {
        let mut s = Scratch::default();
        for (i, (da, db)) in da.chunks_mut(h).zip(db.chunks_mut(h)).enumerate() {
            row(&mut s, i, da, db);
        }
    }
    out
}

/// One candidate of a top-k search: ordered by score, then by the lower index
/// (so `a > b` means `a` ranks first).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hit {
    score: f64,
    index: u32,
}

impl Eq for Hit {}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.index.cmp(&self.index))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The best `k` hits offered so far: a heap whose top is the worst of them, so
/// a hit that does not make the list costs one comparison.
#[derive(Debug, Clone)]
struct TopList {
    k: usize,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Hit>>,
}

impl TopList {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: std::collections::BinaryHeap::with_capacity(k + 1),
        }
    }

    /// The worst score on the list once it is full: a hit must beat it.
    #[inline]
    fn worst(&self) -> Option<f64> {
        if self.heap.len() < self.k {
            return None;
        }
        self.heap.peek().map(|w| w.0.score)
    }

    #[inline]
    fn offer(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(std::cmp::Reverse(hit));
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if hit > worst.0 {
                *worst = std::cmp::Reverse(hit);
            }
        }
    }

    fn merge(mut self, other: TopList) -> TopList {
        for hit in other.heap {
            self.offer(hit.0);
        }
        self
    }

    /// Best first.
    fn into_sorted(self) -> impl Iterator<Item = Hit> {
        // Ascending `Reverse` order is descending `Hit` order.
        self.heap.into_sorted_vec().into_iter().map(|r| r.0)
    }
}

/// Corpus rows per rayon job of the top-k search: one job's rows (384 f32
/// values each: 768 KiB) stay in L2 while every query is scored against them.
const TOP_K_CHUNK: usize = 512;

fn to_f64<A: Accum>(v: A) -> f64 {
    num_traits::ToPrimitive::to_f64(&v).unwrap_or(f64::NAN)
}

/// `1 / max(‖x‖, EPS)` from the squared norm.
fn inverse_norm<A: Accum>(sq: A) -> A {
    A::one() / clamped_norm(sq).0
}

/// `out[i·n + j] = Σ_k a[i·h + k] · b[j·h + k]`: the `[m, n]` products of the
/// rows of `a` `[m, h]` and `b` `[n, h]`, one blocked gemm on this thread.
fn row_products<A: Accum + 'static>(a: &[A], b: &[A], h: usize, out: &mut [A]) {
    let (m, n) = (a.len() / h, b.len() / h);
    assert!(a.len() == m * h && b.len() == n * h && out.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above keep every index gemm derives from these
    // strides inside the three slices; `out` is not read (`read_dst` false).
    unsafe {
        gemm::gemm(
            m,
            n,
            h,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            h as isize,
            b.as_ptr(),
            h as isize,
            1,
            A::zero(),
            A::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The `k` (at most the corpus's rows) most cosine-similar corpus rows of each
/// query, best first: `[Q, k, 2]` as (score, index). Corpus chunks run in
/// parallel; each chunk's `[Q, chunk]` dot products are one blocked product
/// (the gemm crate, in the accumulator type), scaled by the inverse norms and
/// offered to one list per query. Memory is one chunk's scores, never `[Q, M]`.
pub(super) fn cosine_top_k<T: FloatElem>(q: &Rows<T>, c: &Rows<T>, k: usize) -> Vec<f64>
where
    Acc<T>: 'static,
{
    let (nq, m, h) = (q.count(), c.count(), q.len());
    let k = k.min(m);
    let mut scratch = Vec::new();
    let mut queries: Vec<Acc<T>> = Vec::with_capacity(nq * h);
    let mut inv_q: Vec<Acc<T>> = Vec::with_capacity(nq);
    for i in 0..nq {
        let row = q.row(i, &mut scratch);
        queries.extend(row.iter().map(|v| v.to_acc()));
        inv_q.push(inverse_norm(sum_sq(row)));
    }
    // How far a gemm product may stray from the row-by-row dot product, on the
    // cosine scale: rounding of h products and sums, |cos| <= 1.
    let slack = 4.0 * (h as f64 + 2.0) * to_f64(Acc::<T>::epsilon());
    let chunk_lists = |chunk: usize| -> Vec<TopList> {
        let mut lists = vec![TopList::new(k); nq];
        let rows = chunk * TOP_K_CHUNK..m.min((chunk + 1) * TOP_K_CHUNK);
        let mut scratch = Vec::new();
        let mut corpus: Vec<Acc<T>> = Vec::with_capacity(rows.len() * h);
        let mut inv_c: Vec<Acc<T>> = Vec::with_capacity(rows.len());
        for i in rows.clone() {
            let row = c.row(i, &mut scratch);
            corpus.extend(row.iter().map(|v| v.to_acc()));
            inv_c.push(inverse_norm(sum_sq(row)));
        }
        let mut dots = vec![Acc::<T>::zero(); nq * rows.len()];
        row_products(&queries, &corpus, h, &mut dots);
        for (qi, (list, dots)) in lists.iter_mut().zip(dots.chunks(rows.len())).enumerate() {
            let mut query_scratch = Vec::new();
            for ((i, &d), &ic) in rows.clone().zip(dots).zip(&inv_c) {
                let approx = to_f64(d * inv_q[qi] * ic);
                if list.worst().is_some_and(|w| approx + slack < w) {
                    continue;
                }
                // A candidate: scored again row by row, so its score does not
                // depend on where the row fell in the gemm's blocks (an exact
                // duplicate scores exactly alike, and ties go to the lower index).
                let exact = dot(q.row(qi, &mut query_scratch), c.row(i, &mut scratch));
                let score = to_f64(exact * inv_q[qi] * ic);
                list.offer(Hit {
                    score: if score.is_nan() {
                        f64::NEG_INFINITY
                    } else {
                        score
                    },
                    index: i as u32,
                });
            }
        }
        lists
    };
    let merge = |a: Vec<TopList>, b: Vec<TopList>| -> Vec<TopList> {
        a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect()
    };
    let chunks = m.div_ceil(TOP_K_CHUNK);
    let lists = if nq * m * h >= PARALLEL_MIN_ELEMS {
        (0..chunks)
            .into_par_iter()
            .map(chunk_lists)
            .reduce_with(merge)
    } else {
        (0..chunks).map(chunk_lists).reduce(merge)
    }
    .unwrap_or_else(|| vec![TopList::new(k); nq]);
    lists
        .into_iter()
        .flat_map(|list| {
            list.into_sorted()
                .flat_map(|hit| [hit.score, hit.index as f64])
        })
        .collect()
}
