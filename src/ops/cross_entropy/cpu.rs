//! The CPU path of the dual-head cross-entropy: tiles of rows that every row
//! goes through alike (labelled or not), vectorised `exp` and `ln`, rayon over
//! row chunks for large batches.

use super::*;

/// Rows per parallel work item, fixed by the class counts alone so that the
/// summation order (and so the result) does not depend on the thread count.
fn chunk_rows(dims: Dims) -> usize {
    const ELEMS_PER_CHUNK: usize = 16 * 1024;
    (ELEMS_PER_CHUNK / (dims.classes[0] + dims.classes[1])).max(1)
}

/// Rows per tile: a tile's shifted logits (at most this many values per head)
/// stay in L1 between the passes over them.
fn tile_rows(dims: Dims) -> usize {
    const ELEMS_PER_TILE: usize = 2048;
    (ELEMS_PER_TILE / dims.classes[0].max(dims.classes[1])).max(1)
}

/// Below this many logits a single thread beats rayon's fork/join overhead.
const PARALLEL_MIN_ELEMS: usize = 64 * 1024;

fn run_parallel(dims: Dims) -> bool {
    grad_len(dims) >= PARALLEL_MIN_ELEMS
}

/// The row ranges of the (parallel) work items.
fn chunks(dims: Dims) -> Vec<std::ops::Range<usize>> {
    let step = chunk_rows(dims);
    (0..dims.n.div_ceil(step))
        .map(|c| c * step..((c + 1) * step).min(dims.n))
        .collect()
}

/// `exp` and `ln` of every element of a slice, in place. For f32 (the
/// accumulator of f32, f16 and bf16) branch-free polynomials that the compiler
/// vectorises: a libm call per element would otherwise be most of the op's time.
pub(super) trait ExpLnInPlace: Accum {
    fn exp_in_place(values: &mut [Self]);
    fn ln_in_place(values: &mut [Self]);
}

impl ExpLnInPlace for f32 {
    fn exp_in_place(values: &mut [f32]) {
        for v in values {
            *v = exp_f32(*v);
        }
    }

    fn ln_in_place(values: &mut [f32]) {
        for v in values {
            *v = ln_f32(*v);
        }
    }
}

impl ExpLnInPlace for f64 {
    fn exp_in_place(values: &mut [f64]) {
        for v in values {
            *v = v.exp();
        }
    }

    fn ln_in_place(values: &mut [f64]) {
        for v in values {
            *v = v.ln();
        }
    }
}

/// One head's logits on the CPU: the storage slice and its strided view.
pub(super) struct Logits<'a, T> {
    data: &'a [T],
    view: View<2>,
}

impl<'a, T: FloatElem> Logits<'a, T> {
    pub(super) fn new(storage: &'a CpuStorage, view: View<2>) -> Result<Self> {
        Ok(Self {
            data: storage.as_slice::<T>()?,
            view,
        })
    }

    /// Rows `rows` as one slice, when they lie back to back (unit-stride rows
    /// `classes` apart).
    fn tile(&self, rows: std::ops::Range<usize>) -> Option<&'a [T]> {
        let classes = self.view.dims[1];
        let packed = self.view.strides[1] == 1 || classes == 1;
        if !packed || (self.view.strides[0] != classes && rows.len() > 1) || rows.is_empty() {
            return None;
        }
        let start = self.view.at([rows.start, 0]);
        Some(&self.data[start..start + rows.len() * classes])
    }

    /// Appends row `i` minus its maximum to `out`. Unit-stride rows are read as
    /// a plain slice; other rows by index, since the class stride may be 0 (a
    /// `broadcast_as` along the classes).
    #[inline(always)]
    fn push_shifted_row(&self, i: usize, out: &mut Vec<T::Acc>) {
        let start = self.view.at([i, 0]);
        let (classes, stride) = (self.view.dims[1], self.view.strides[1]);
        if stride == 1 || classes == 1 {
            push_shifted(self.data[start..start + classes].iter(), out);
        } else {
            let data = self.data;
            push_shifted((0..classes).map(|c| &data[start + c * stride]), out);
        }
    }
}

#[inline(always)]
fn push_shifted<'a, T: FloatElem>(row: impl Iterator<Item = &'a T> + Clone, out: &mut Vec<T::Acc>) {
    // `>` rather than `max`: a NaN logit then poisons the row instead of vanishing.
    let max = row
        .clone()
        .map(|x| x.to_acc())
        .reduce(|m, x| if x > m { x } else { m })
        .expect("a head has at least one class");
    out.extend(row.map(|x| x.to_acc() - max));
}

/// Evaluates `$body` with `$c` bound to `$classes`: as a literal constant when
/// it is 2 to 8 (the class counts of classification heads), so that the
/// `#[inline(always)]` row loops in `$body` get a fixed row size, unroll and
/// vectorise across rows; as the runtime value otherwise.
macro_rules! with_small_classes {
    ($classes:expr, $c:ident => $body:expr) => {
        match $classes {
            2 => {
                let $c = 2;
                $body
            }
            3 => {
                let $c = 3;
                $body
            }
            4 => {
                let $c = 4;
                $body
            }
            5 => {
                let $c = 5;
                $body
            }
            6 => {
                let $c = 6;
                $body
            }
            7 => {
                let $c = 7;
                $body
            }
            8 => {
                let $c = 8;
                $body
            }
            $c => $body,
        }
    };
}

/// Appends each `classes`-sized row of `tile` minus the row's maximum to `out`
/// (the tile form of [`push_shifted`], with the same NaN rule).
#[inline(always)]
fn shift_by_row_max<T: FloatElem>(tile: &[T], classes: usize, out: &mut Vec<T::Acc>) {
    let base = out.len();
    out.resize(base + tile.len(), T::Acc::zero());
    let rows = out[base..]
        .chunks_exact_mut(classes)
        .zip(tile.chunks_exact(classes));
    for (o, row) in rows {
        let max =
            row[1..].iter().fold(
                row[0].to_acc(),
                |m, v| if v.to_acc() > m { v.to_acc() } else { m },
            );
        for (o, v) in o.iter_mut().zip(row) {
            *o = v.to_acc() - max;
        }
    }
}

/// Appends the sum of each `classes`-sized row of `values` to `out`.
#[inline(always)]
fn row_sums<A: Accum>(values: &[A], classes: usize, out: &mut Vec<A>) {
    out.extend(
        values
            .chunks_exact(classes)
            .map(|row| row.iter().copied().sum::<A>()),
    );
}

/// The labels on the CPU: the storage slice and its `[N,2]` view.
pub(super) struct Labels<'a, L> {
    data: &'a [L],
    view: View<2>,
}

impl<'a, L: Label> Labels<'a, L> {
    pub(super) fn new(storage: &'a CpuStorage, view: View<2>) -> Result<Self> {
        Ok(Self {
            data: storage.as_slice::<L>()?,
            view,
        })
    }

    /// Row `i`'s class for `head`, `None` if ignored, an `Err` if out of range.
    #[inline(always)]
    fn class(&self, i: usize, head: usize, classes: usize) -> Result<Option<usize>> {
        decode(self.data[self.view.at([i, head])], classes)
            .map_err(|value| label_out_of_range(head, i, value, classes, L::IGNORE.to_i64()))
    }

    /// Appends, for each row of `rows`, its class for `head` (0 for an ignored
    /// row, so that it can index the row) to `class` and whether it is labelled
    /// to `labelled`. Branch-free: which rows a mixed batch labels for a head is
    /// unpredictable. An `Err` names the first out-of-range label of the rows.
    fn decode_rows(
        &self,
        rows: std::ops::Range<usize>,
        head: usize,
        classes: usize,
        class: &mut Vec<usize>,
        labelled: &mut Vec<bool>,
    ) -> Result<()> {
        let (n, stride) = (rows.len(), self.view.strides[0]);
        let first = self.view.at([rows.start, head]);
        class.clear();
        class.resize(n, 0);
        labelled.clear();
        labelled.resize(n, false);
        let mut out_of_range = false;
        for (k, (class, labelled)) in class.iter_mut().zip(labelled.iter_mut()).enumerate() {
            let label = self.data[first + k * stride];
            let value = label.to_i64();
            let ignored = label == L::IGNORE;
            let in_range = (value >= 0) & ((value as u64) < classes as u64);
            out_of_range |= !ignored & !in_range;
            *class = if in_range { value as usize } else { 0 };
            *labelled = !ignored;
        }
        if out_of_range {
            for i in rows {
                self.class(i, head, classes)?;
            }
        }
        Ok(())
    }

    /// The error for the first out-of-range label by row (then head), if any.
    /// Tiles go head by head, so this in-order scan names the label the user
    /// would find first.
    fn first_error(&self, dims: Dims) -> Result<()> {
        for i in 0..dims.n {
            for (head, &classes) in dims.classes.iter().enumerate() {
                self.class(i, head, classes)?;
            }
        }
        Ok(())
    }
}

/// One head over a tile of rows, every row computed alike whether labelled or
/// not (the loops then have no data-dependent branches and vectorise; an
/// ignored row's values are never used): `exps[k*C..(k+1)*C]` holds
/// `exp(x − max)` of row `start + k`, `sums[k]` their sum, `losses[k]` the row's
/// cross-entropy `ln(sums[k]) − (x[label] − max)`.
struct Tile<A> {
    exps: Vec<A>,
    sums: Vec<A>,
    losses: Vec<A>,
    class: Vec<usize>,
    labelled: Vec<bool>,
}

impl<A: ExpLnInPlace> Tile<A> {
    fn new() -> Self {
        Self {
            exps: Vec::new(),
            sums: Vec::new(),
            losses: Vec::new(),
            class: Vec::new(),
            labelled: Vec::new(),
        }
    }

    fn fill<T: FloatElem<Acc = A>, L: Label>(
        &mut self,
        rows: std::ops::Range<usize>,
        head: usize,
        logits: &Logits<'_, T>,
        labels: &Labels<'_, L>,
    ) -> Result<()> {
        let classes = logits.view.dims[1];
        self.class.clear();
        self.labelled.clear();
        labels.decode_rows(
            rows.clone(),
            head,
            classes,
            &mut self.class,
            &mut self.labelled,
        )?;
        self.exps.clear();
        match logits.tile(rows.clone()) {
            Some(tile) => {
                with_small_classes!(classes, c => shift_by_row_max(tile, c, &mut self.exps))
            }
            None => {
                for i in rows {
                    logits.push_shifted_row(i, &mut self.exps);
                }
            }
        }
        // x[label] − max, taken before the exponentials overwrite it.
        self.losses.clear();
        let shifted = self.exps.chunks_exact(classes).zip(&self.class);
        self.losses.extend(shifted.map(|(row, &c)| row[c]));
        A::exp_in_place(&mut self.exps);
        self.sums.clear();
        with_small_classes!(classes, c => row_sums(&self.exps, c, &mut self.sums));
        // losses = ln(sums) − (x[label] − max), with ln vectorised over the tile.
        let shifted_label = std::mem::replace(&mut self.losses, self.sums.clone());
        A::ln_in_place(&mut self.losses);
        for (loss, s) in self.losses.iter_mut().zip(shifted_label) {
            *loss = *loss - s;
        }
        Ok(())
    }

    /// Writes `softmax − onehot` for each labelled row of the tile and 0 for an
    /// ignored one (whatever its logits) into `out`, `classes` per row, every
    /// element. Inlined so that a constant `classes` unrolls the row loop. Turns
    /// `sums` into their reciprocals on the way (one vectorised pass of divisions
    /// rather than one division per row in the row loop), so call it last.
    #[inline(always)]
    fn write_grads(&mut self, out: &mut [A], classes: usize) {
        for s in &mut self.sums {
            *s = s.recip();
        }
        let rows = out
            .chunks_exact_mut(classes)
            .zip(self.exps.chunks_exact(classes))
            .zip(self.sums.iter().zip(self.class.iter().zip(&self.labelled)));
        for ((out, exps), (&inv, (&class, &labelled))) in rows {
            for (j, (o, &e)) in out.iter_mut().zip(exps).enumerate() {
                let onehot = if j == class { A::one() } else { A::zero() };
                *o = (e * inv - onehot).or_zero(labelled);
            }
        }
    }

    /// The tile's loss sum and labelled-row count. The select (not a product
    /// with 0/1) keeps an ignored row's NaN or infinity out.
    fn loss_and_count(&self) -> (A, usize) {
        let mut sum = A::zero();
        let mut count = 0;
        for (&loss, &labelled) in self.losses.iter().zip(&self.labelled) {
            sum += if labelled { loss } else { A::zero() };
            count += labelled as usize;
        }
        (sum, count)
    }
}

/// Loss sums and labelled-row counts of a run of rows, per head.
#[derive(Clone, Copy)]
struct Partial<A> {
    loss: [A; 2],
    count: [usize; 2],
}

/// The tile loop over one chunk of rows: loss sums and counts per head, and,
/// when a sink is given (the chunk's rows of each head's gradient),
/// `softmax − onehot` written into it.
fn forward_rows<T: FloatElem, L: Label>(
    rows: std::ops::Range<usize>,
    dims: Dims,
    logits: &[Logits<'_, T>; 2],
    labels: &Labels<'_, L>,
    mut grads: Option<[&mut [T::Acc]; 2]>,
) -> Result<Partial<T::Acc>>
where
    T::Acc: ExpLnInPlace,
{
    let mut part = Partial {
        loss: [T::Acc::zero(); 2],
        count: [0; 2],
    };
    let mut tile = Tile::new();
    for start in rows.clone().step_by(tile_rows(dims)) {
        let tile_rows = start..(start + tile_rows(dims)).min(rows.end);
        for (head, logits) in logits.iter().enumerate() {
            tile.fill(tile_rows.clone(), head, logits, labels)?;
            let (loss, count) = tile.loss_and_count();
            part.loss[head] += loss;
            part.count[head] += count;
            if let Some(outs) = grads.as_mut() {
                let classes = dims.classes[head];
                let out =
                    &mut outs[head][(start - rows.start) * classes..][..tile.sums.len() * classes];
                with_small_classes!(classes, c => tile.write_grads(out, c));
            }
        }
    }
    Ok(part)
}

/// Runs [`forward_rows`] on every chunk (in parallel for large batches), each
/// chunk with its rows of `grads` when given, and sums the partials in chunk
/// order, so the result does not depend on the number of threads.
fn forward_chunks<T: FloatElem, L: Label>(
    dims: Dims,
    logits: &[Logits<'_, T>; 2],
    labels: &Labels<'_, L>,
    grads: Option<&mut [T::Acc]>,
) -> Result<([T; 2], [usize; 2])>
where
    T::Acc: ExpLnInPlace,
{
    let step = chunk_rows(dims);
    let sinks: Vec<Option<[&mut [T::Acc]; 2]>> = match grads {
        Some(grads) => {
            let (grad_a, grad_b) = grads.split_at_mut(dims.n * dims.classes[0]);
            grad_a
                .chunks_mut(step * dims.classes[0])
                .zip(grad_b.chunks_mut(step * dims.classes[1]))
                .map(|(a, b)| Some([a, b]))
                .collect()
        }
        None => (0..dims.n.div_ceil(step)).map(|_| None).collect(),
    };
    let work: Vec<_> = chunks(dims).into_iter().zip(sinks).collect();
    let chunk = |(rows, sink)| forward_rows(rows, dims, logits, labels, sink);
    let partials: Result<Vec<Partial<T::Acc>>> = if run_parallel(dims) {
        work.into_par_iter().map(chunk).collect()
    } else {
        work.into_iter().map(chunk).collect()
    };
    let partials = match partials {
        Ok(partials) => partials,
        Err(e) => {
            // Chunks fail in any order: report the first bad label.
            labels.first_error(dims)?;
            return Err(e);
        }
    };
    Ok(mean_losses::<T>(partials))
}

/// The two mean losses (in `T`) and the labelled-row counts.
pub(super) fn forward_cpu<T: FloatElem, L: Label>(
    dims: Dims,
    logits: &[Logits<'_, T>; 2],
    labels: &Labels<'_, L>,
) -> Result<([T; 2], [usize; 2])>
where
    T::Acc: ExpLnInPlace,
{
    forward_chunks(dims, logits, labels, None)
}

/// Sums the partials in order (the same result for any thread count) into the
/// two mean losses (0 for a head without labelled rows) and the counts.
fn mean_losses<T: FloatElem>(partials: Vec<Partial<T::Acc>>) -> ([T; 2], [usize; 2]) {
    let mut total = Partial {
        loss: [T::Acc::zero(); 2],
        count: [0; 2],
    };
    for part in partials {
        for h in 0..2 {
            total.loss[h] += part.loss[h];
            total.count[h] += part.count[h];
        }
    }
    let mean = |h: usize| match total.count[h] {
        0 => T::Acc::zero(),
        n => total.loss[h] / T::Acc::of(n as f64),
    };
    ([T::from_acc(mean(0)), T::from_acc(mean(1))], total.count)
}

/// The forward with the unscaled gradients: the two mean losses, the
/// labelled-row counts and `softmax − onehot` for every labelled row (zero for
/// ignored rows), head A's `[N,Ca]` then head B's `[N,Cb]`, in the accumulator
/// type. One pass over the logits, chunks of rows in parallel.
#[allow(clippy::type_complexity)]
pub(super) fn forward_with_grads_cpu<T: FloatElem, L: Label>(
    dims: Dims,
    logits: &[Logits<'_, T>; 2],
    labels: &Labels<'_, L>,
) -> Result<([T; 2], [usize; 2], Vec<T::Acc>)>
where
    T::Acc: ExpLnInPlace + WithDType,
{
    // SAFETY: the tile loop writes every row of both heads (tile by tile).
    let mut grads = unsafe { output_buffer::<T::Acc>(grad_len(dims)) };
    let (losses, counts) = forward_chunks(dims, logits, labels, Some(&mut grads))?;
    Ok((losses, counts, grads))
}
