//! The one place where dtypes are dispatched.
//!
//! Every op writes its CPU (and CUDA) body once, generic over [`FloatElem`], and
//! `with_float_dtype!` picks the instance that matches a tensor's dtype. Half
//! types accumulate in f32, f64 accumulates in f64. `with_gemm_dtype!` does the
//! same for the fused matrix products (f32, f64) and `with_label_dtype!` for the
//! integer label dtypes of the cross-entropy ([`Label`]).

use candle_core::{DType, WithDType};

use super::cross_entropy::IGNORE_INDEX;
use half::{bf16, f16};

/// The accumulator type of an op: f32 for f16/bf16/f32 inputs, f64 for f64.
pub trait Accum:
    num_traits::Float
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn of(v: f64) -> Self;
    /// `self` if `keep`, else +0 (NaN and infinities too), by masking the bits:
    /// no branch, so a loop of these vectorises.
    fn or_zero(self, keep: bool) -> Self;
}

impl Accum for f32 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }

    #[inline(always)]
    fn or_zero(self, keep: bool) -> Self {
        f32::from_bits(self.to_bits() & 0u32.wrapping_sub(keep as u32))
    }
}

impl Accum for f64 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }

    #[inline(always)]
    fn or_zero(self, keep: bool) -> Self {
        f64::from_bits(self.to_bits() & 0u64.wrapping_sub(keep as u64))
    }
}

/// A floating-point element type the ops accept (f32, f16, bf16, f64).
pub trait FloatElem: WithDType + Copy + Send + Sync + 'static {
    type Acc: Accum;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(v: Self::Acc) -> Self;
}

macro_rules! float_elem {
    ($t:ty, $acc:ty, $to:expr, $from:expr) => {
        impl FloatElem for $t {
            type Acc = $acc;
            #[inline(always)]
            fn to_acc(self) -> $acc {
                $to(self)
            }
            #[inline(always)]
            fn from_acc(v: $acc) -> Self {
                $from(v)
            }
        }
    };
}

float_elem!(f32, f32, |x: f32| x, |v: f32| v);
float_elem!(f64, f64, |x: f64| x, |v: f64| v);
float_elem!(f16, f32, f16::to_f32, f16::from_f32);
float_elem!(bf16, f32, bf16::to_f32, bf16::from_f32);

/// The dtype in which the composed (candle-op) forms accumulate softmax and
/// LayerNorm statistics: f32 for the half types (their 8- or 11-bit mantissas
/// lose too much in sums of hundreds of terms), the input's own dtype otherwise.
/// The same rule as `FloatElem::Acc`, for tensors.
pub fn accumulation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// The error every op gives for a dtype it does not support.
pub fn unsupported_dtype(op: &str, what: &str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: unsupported dtype {dtype:?} for {what} (expected f32, f16, bf16 or f64)"
    ))
}

/// `Ok` for the float dtypes the ops take (f32, f16, bf16, f64), else the
/// error [`with_float_dtype!`] gives, naming `op` and the input `what`.
pub fn check_float_dtype(op: &str, what: &str, dtype: DType) -> candle_core::Result<()> {
    with_float_dtype!(op, what, dtype, _T => Ok(()))
}

/// Runs `$body` with the type alias `$T` bound to the Rust type of a float `$dtype`
/// (f32, f16, bf16, f64); any other dtype is an `Err` naming the op and the input.
///
/// ```ignore
/// with_float_dtype!("masked_mean_pool", "hidden", dtype, T => pool_cpu::<T>(storage, layout))
/// ```
macro_rules! with_float_dtype {
    ($op:expr, $what:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            ::candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            ::candle_core::DType::F16 => {
                type $T = ::half::f16;
                $body
            }
            ::candle_core::DType::BF16 => {
                type $T = ::half::bf16;
                $body
            }
            ::candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            other => Err($crate::ops::dtype::unsupported_dtype($op, $what, other)),
        }
    };
}
pub(crate) use with_float_dtype;

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` when it is f32
/// or f64 (the dtypes of `matmul::GemmFloat`); any other is an `Err` naming `$op`
/// and the input `$what`.
macro_rules! with_gemm_dtype {
    ($op:expr, $what:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            ::candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            ::candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            other => Err($crate::ops::dtype::unsupported_dtype($op, $what, other)),
        }
    };
}
pub(crate) use with_gemm_dtype;

pub(crate) fn bad_label_dtype(dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "dual_head_cross_entropy: labels must have an integer dtype (i64, i32, i16, u32 or u8), got {dtype:?}"
    ))
}

pub(crate) fn check_label_dtype(dtype: DType) -> candle_core::Result<()> {
    match dtype {
        DType::I64 | DType::I32 | DType::I16 | DType::U32 | DType::U8 => Ok(()),
        other => Err(bad_label_dtype(other)),
    }
}

/// An integer label dtype and the value that marks "no label for this head".
pub(crate) trait Label: WithDType {
    /// -100 for signed dtypes; the maximum value for unsigned ones.
    const IGNORE: Self;
    fn to_i64(self) -> i64;
}

macro_rules! label {
    ($t:ty, $ignore:expr) => {
        impl Label for $t {
            const IGNORE: Self = $ignore;
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self as i64
            }
        }
    };
}

label!(i64, IGNORE_INDEX);
label!(i32, IGNORE_INDEX as i32);
label!(i16, IGNORE_INDEX as i16);
label!(u32, u32::MAX);
label!(u8, u8::MAX);

/// Runs `$body` with `$L` bound to the Rust type of an integer label `$dtype`;
/// any other dtype (floats included) is an `Err`. The label counterpart of
/// `with_float_dtype!`.
macro_rules! with_label_dtype {
    ($dtype:expr, $L:ident => $body:expr) => {
        match $dtype {
            ::candle_core::DType::I64 => {
                type $L = i64;
                $body
            }
            ::candle_core::DType::I32 => {
                type $L = i32;
                $body
            }
            ::candle_core::DType::I16 => {
                type $L = i16;
                $body
            }
            ::candle_core::DType::U32 => {
                type $L = u32;
                $body
            }
            ::candle_core::DType::U8 => {
                type $L = u8;
                $body
            }
            other => Err($crate::ops::dtype::bad_label_dtype(other)),
        }
    };
}
pub(crate) use with_label_dtype;
