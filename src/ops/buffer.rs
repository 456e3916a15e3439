//! Output buffers of the CPU paths.

/// A vector of `len` elements for an op that writes every one of them before
/// the vector is read. `vec![0.0; len]` would first zero-fill it: one more
/// pass over memory, a third of the traffic of a memory-bound op such as
/// `l2_normalize` (read, zero, write).
///
/// # Safety
/// The caller must write every element before reading any or handing the
/// vector out. `T` is a plain float type (no drop glue, every bit pattern valid).
// clippy's `uninit_vec` guards against exactly this; here it is the point, under
// the contract above (candle's CPU backend does the same for its outputs).
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn output_buffer<T: Copy>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; the caller initialises every element.
    unsafe { v.set_len(len) };
    v
}
