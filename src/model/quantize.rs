//! Quantised embeddings, with sentence-transformers' `quantize_embeddings`
//! semantics: `int8`/`uint8` map each dimension's calibrated range onto 256
//! levels, `binary`/`ubinary` keep the sign bit of each value, packed 8 per byte.
//!
//! Two deliberate differences from sentence-transformers, both where it has no
//! defined answer: a value outside the calibrated range saturates (numpy's cast
//! of an out-of-range float is undefined), and a dimension whose range is a
//! single value maps to the lowest level (numpy divides by zero). Binary rows
//! are packed per row, the last byte zero-padded, so a width that is not a
//! multiple of 8 keeps its rows apart (numpy packs the flattened matrix).

use std::io::Write;
use std::path::Path;

use anyhow::{ensure, Context};
use candle_core::{DType, Tensor};

/// The number type of an embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The float32 values as they are.
    Float32,
    /// One signed byte per value: `(x - min) / ((max - min) / 255) - 128`, truncated.
    Int8,
    /// One unsigned byte per value: `(x - min) / ((max - min) / 255)`, truncated.
    Uint8,
    /// One bit per value (1 where `x > 0`), 8 per byte, the byte stored minus 128 as i8.
    Binary,
    /// One bit per value (1 where `x > 0`), 8 per byte, first value in the high bit.
    Ubinary,
}

impl Precision {
    /// Bytes (or floats, for `Float32`) per row of a `dim`-wide embedding.
    pub fn row_width(self, dim: usize) -> usize {
        match self {
            Precision::Float32 | Precision::Int8 | Precision::Uint8 => dim,
            Precision::Binary | Precision::Ubinary => dim.div_ceil(8),
        }
    }
}

/// The values of quantised embeddings, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedValues {
    /// `float32`.
    F32(Vec<f32>),
    /// `int8` and `binary`.
    I8(Vec<i8>),
    /// `uint8` and `ubinary`.
    U8(Vec<u8>),
}

/// Embeddings in a chosen [`Precision`]: `rows × width` values, where `width` is
/// [`Precision::row_width`] of the embedding dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedEmbeddings {
    /// The precision the values are in.
    pub precision: Precision,
    /// The number of embeddings.
    pub rows: usize,
    /// Values (bytes for the binary precisions) per embedding.
    pub width: usize,
    /// The values.
    pub values: QuantizedValues,
}

/// Each dimension's calibrated range for `int8`/`uint8`: the minimum and
/// maximum over the calibration embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranges {
    /// Per dimension, the value that maps to the lowest level.
    pub min: Vec<f32>,
    /// Per dimension, the value that maps to the highest level.
    pub max: Vec<f32>,
}

impl Ranges {
    /// The per-dimension min and max of `rows` (at least one row, all finite).
    pub fn from_rows(rows: &[Vec<f32>]) -> anyhow::Result<Self> {
        ensure!(!rows.is_empty(), "no calibration embeddings");
        let dim = rows[0].len();
        let mut min = vec![f32::INFINITY; dim];
        let mut max = vec![f32::NEG_INFINITY; dim];
        for (i, row) in rows.iter().enumerate() {
            ensure!(
                row.len() == dim,
                "calibration row {i} has {} values, row 0 has {dim}",
                row.len()
            );
            for (d, &v) in row.iter().enumerate() {
                ensure!(
                    v.is_finite(),
                    "calibration row {i} holds a non-finite value"
                );
                min[d] = min[d].min(v);
                max[d] = max[d].max(v);
            }
        }
        Ok(Self { min, max })
    }
}

/// Quantises `embeddings` (`[N, D]`, any float dtype) to `precision`. `int8` and
/// `uint8` calibrate on `ranges` where given, else on the embeddings themselves.
pub fn quantize_embeddings(
    embeddings: &Tensor,
    precision: Precision,
    ranges: Option<&Ranges>,
) -> anyhow::Result<QuantizedEmbeddings> {
    ensure!(
        embeddings.rank() == 2,
        "embeddings must be [N, D], got shape {:?}",
        embeddings.dims()
    );
    let rows = embeddings.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    quantize_rows(&rows, embeddings.dim(1)?, precision, ranges)
}

/// [`quantize_embeddings`] on rows already read out (`dim` values each).
pub fn quantize_rows(
    rows: &[Vec<f32>],
    dim: usize,
    precision: Precision,
    ranges: Option<&Ranges>,
) -> anyhow::Result<QuantizedEmbeddings> {
    ensure!(dim > 0, "embeddings of width 0");
    ensure!(rows.iter().all(|r| r.len() == dim), "rows of unequal width");
    let width = precision.row_width(dim);
    let values = match precision {
        Precision::Float32 => QuantizedValues::F32(rows.concat()),
        Precision::Int8 | Precision::Uint8 => {
            let own;
            let ranges = match ranges {
                Some(r) => r,
                None => {
                    own = Ranges::from_rows(rows)?;
                    &own
                }
            };
            ensure!(
                ranges.min.len() == dim && ranges.max.len() == dim,
                "calibration ranges are {} wide, embeddings {dim}",
                ranges.min.len()
            );
            // f32 arithmetic in numpy's order, so in-range values truncate alike.
            let steps: Vec<f32> = (0..dim)
                .map(|d| (ranges.max[d] - ranges.min[d]) / 255.0)
                .collect();
            let level = |d: usize, x: f32| {
                if steps[d] > 0.0 {
                    (x - ranges.min[d]) / steps[d]
                } else {
                    0.0
                }
            };
            let levels = rows
                .iter()
                .flat_map(|row| row.iter().enumerate().map(|(d, &x)| level(d, x)));
            // `as` truncates toward zero and saturates (NaN gives 0).
            if precision == Precision::Uint8 {
                QuantizedValues::U8(levels.map(|l| l as u8).collect())
            } else {
                QuantizedValues::I8(levels.map(|l| (l - 128.0) as i8).collect())
            }
        }
        Precision::Binary | Precision::Ubinary => {
            let packed: Vec<u8> = rows.iter().flat_map(|row| pack_signs(row)).collect();
            if precision == Precision::Ubinary {
                QuantizedValues::U8(packed)
            } else {
                QuantizedValues::I8(packed.iter().map(|&b| (b as i16 - 128) as i8).collect())
            }
        }
    };
    Ok(QuantizedEmbeddings {
        precision,
        rows: rows.len(),
        width,
        values,
    })
}

/// 1 bits where a value is positive, 8 values per byte, the first in the high bit.
fn pack_signs(row: &[f32]) -> Vec<u8> {
    row.chunks(8)
        .map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .fold(0u8, |byte, (k, &x)| byte | (u8::from(x > 0.0) << (7 - k)))
        })
        .collect()
}

impl QuantizedEmbeddings {
    /// The rows as JSON arrays of numbers.
    pub fn to_json_rows(&self) -> serde_json::Value {
        fn rows<T: Into<serde_json::Value> + Copy>(v: &[T], width: usize) -> serde_json::Value {
            v.chunks(width.max(1))
                .map(|r| r.iter().map(|&x| x.into()).collect::<Vec<_>>().into())
                .collect::<Vec<serde_json::Value>>()
                .into()
        }
        match &self.values {
            QuantizedValues::F32(v) => rows(v, self.width),
            QuantizedValues::I8(v) => rows(v, self.width),
            QuantizedValues::U8(v) => rows(v, self.width),
        }
    }

    /// Writes a `[rows, width]` .npy file (`<f4`, `|i1` or `|u1`).
    pub fn write_npy(&self, path: &Path) -> anyhow::Result<()> {
        let (descr, bytes): (&str, Vec<u8>) = match &self.values {
            QuantizedValues::F32(v) => ("<f4", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            QuantizedValues::I8(v) => ("|i1", v.iter().map(|&x| x as u8).collect()),
            QuantizedValues::U8(v) => ("|u1", v.clone()),
        };
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}), }}",
            self.rows, self.width
        );
        // Magic (6) + version (2) + length (2) + header, padded to 64 bytes, ending in \n.
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
        header.push('\n');
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
            file.write_all(b"\x93NUMPY\x01\x00")?;
            file.write_all(&(header.len() as u16).to_le_bytes())?;
            file.write_all(header.as_bytes())?;
            file.write_all(&bytes)?;
            file.flush()
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Vec<f32>> {
        vec![
            vec![-1.0, 0.5, 0.25, -0.1, 0.9, 0.0, 0.3, -0.7, 0.2],
            vec![1.0, -0.5, 0.75, 0.1, -0.9, 2.0, -0.3, 0.7, -0.2],
            vec![0.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        ]
    }

    // sentence-transformers' formulas in numpy 2 (float32) give, for dimension 0
    // ([-1, 1, 0]): uint8 [0, 254, 127], int8 [-128, 126, 0]; and for dimension 2
    // ([0.25, 0.75, 0.5]): uint8 [0, 254, 127]. The maximum lands on 254 because
    // 2 / (2/255) is 254.99998 in float32, and the casts truncate toward zero.
    #[test]
    fn uint8_and_int8_follow_the_calibrated_ranges_as_numpy() {
        let q = quantize_rows(&rows(), 9, Precision::Uint8, None).unwrap();
        let QuantizedValues::U8(v) = &q.values else {
            panic!()
        };
        assert_eq!([v[0], v[9], v[18]], [0, 254, 127]);
        assert_eq!([v[2], v[11], v[20]], [0, 254, 127]);
        let q = quantize_rows(&rows(), 9, Precision::Int8, None).unwrap();
        let QuantizedValues::I8(v) = &q.values else {
            panic!()
        };
        assert_eq!([v[0], v[9], v[18]], [-128, 126, 0]);
    }

    #[test]
    fn calibration_ranges_apply_and_values_outside_saturate() {
        let calib = Ranges::from_rows(&[vec![0.0, 0.0], vec![1.0, 0.0]]).unwrap();
        let q = quantize_rows(
            &[vec![2.0, 5.0], vec![-1.0, 0.5]],
            2,
            Precision::Uint8,
            Some(&calib),
        )
        .unwrap();
        // 2.0 is above the range: 255; -1 below: 0; dimension 1 is a single value: 0.
        assert_eq!(q.values, QuantizedValues::U8(vec![255, 0, 0, 0]));
        let narrow = Ranges::from_rows(&[vec![0.0]]).unwrap();
        assert!(quantize_rows(&[vec![1.0, 2.0]], 2, Precision::Int8, Some(&narrow)).is_err());
    }

    #[test]
    fn binary_packs_signs_high_bit_first_per_row() {
        let q = quantize_rows(&rows(), 9, Precision::Ubinary, None).unwrap();
        assert_eq!(q.width, 2);
        // Row 0: signs 0 1 1 0 1 0 1 0 | 1 → 0b0110_1010 (numpy's packbits: 106), 0b1000_0000.
        // Row 2: 0 0 1 0 0 1 0 0 | 0 (zero is not positive).
        let QuantizedValues::U8(v) = &q.values else {
            panic!()
        };
        assert_eq!(v[..2], [0b0110_1010, 0b1000_0000]);
        assert_eq!(v[4..], [0b0010_0100, 0]);
        let q = quantize_rows(&rows(), 9, Precision::Binary, None).unwrap();
        let QuantizedValues::I8(s) = &q.values else {
            panic!()
        };
        let shifted: Vec<i8> = v.iter().map(|&b| (b as i16 - 128) as i8).collect();
        assert_eq!(*s, shifted);
        assert_eq!(s[5], -128);
    }

    #[test]
    fn npy_header_is_padded_to_64_bytes() {
        let q = quantize_rows(&rows(), 9, Precision::Int8, None).unwrap();
        let path = std::env::temp_dir().join(format!("q-{}.npy", std::process::id()));
        q.write_npy(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(
            header.contains("'descr': '|i1'") && header.contains("(3, 9)"),
            "{header}"
        );
        assert_eq!(bytes.len(), 10 + header_len + 27);
    }
}
