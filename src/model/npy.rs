//! Reading a 2-D `.npy` matrix a block of rows at a time, so a corpus of
//! embeddings larger than memory can be searched chunk by chunk
//! ([`super::search::search_npy`]). Versions 1-3 of the format, C order,
//! little-endian `<f2`, `<f4` or `<f8` values.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};

/// An open `[rows, cols]` float matrix in an `.npy` file.
#[derive(Debug)]
pub struct NpyMatrix {
    path: PathBuf,
    file: File,
    /// Number of rows.
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
    /// The stored dtype.
    pub dtype: DType,
    data_offset: u64,
}

/// The value of `key` in the header's dict (`'key': value`), up to the next
/// top-level comma or closing brace.
fn header_field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(tuple) = rest.strip_prefix('(') {
        return Some(&tuple[..tuple.find(')')?]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

impl NpyMatrix {
    /// Opens `path` and reads its header; an error unless it holds a 2-D,
    /// C-order, little-endian f16/f32/f64 matrix whose size matches the file.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let name = path.display();
        let mut file = File::open(path).with_context(|| format!("cannot open {name}"))?;
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic)
            .with_context(|| format!("{name}: too short for an .npy file"))?;
        ensure!(&magic[..6] == b"\x93NUMPY", "{name}: not an .npy file");
        let header_len = match magic[6] {
            1 => {
                let mut len = [0u8; 2];
                file.read_exact(&mut len)?;
                u16::from_le_bytes(len) as usize
            }
            2 | 3 => {
                let mut len = [0u8; 4];
                file.read_exact(&mut len)?;
                u32::from_le_bytes(len) as usize
            }
            v => bail!("{name}: .npy format version {v} is not supported"),
        };
        let mut header = vec![0u8; header_len];
        file.read_exact(&mut header)
            .with_context(|| format!("{name}: truncated header"))?;
        let header = String::from_utf8_lossy(&header).into_owned();
        let data_offset = file.stream_position()?;

        let descr = header_field(&header, "descr")
            .map(|d| d.trim_matches(['\'', '"']))
            .with_context(|| format!("{name}: header without descr"))?;
        let dtype = match descr {
            "<f2" => DType::F16,
            "<f4" => DType::F32,
            "<f8" => DType::F64,
            other => bail!(
                "{name}: values of dtype {other:?}; an embedding corpus must be float (<f2, <f4 or <f8)"
            ),
        };
        if header_field(&header, "fortran_order") != Some("False") {
            bail!("{name}: Fortran-order arrays are not supported (save it in C order)");
        }
        let shape = header_field(&header, "shape")
            .with_context(|| format!("{name}: header without shape"))?;
        let dims: Vec<usize> = shape
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{name}: bad shape ({shape})"))?;
        let [rows, cols] = dims[..] else {
            bail!("{name}: shape ({shape}) is not 2-D [rows, cols]");
        };
        let expected = data_offset + (rows * cols * dtype.size_in_bytes()) as u64;
        let actual = file.metadata()?.len();
        ensure!(
            actual == expected,
            "{name}: {actual} bytes, but a [{rows}, {cols}] {descr} array needs {expected}"
        );
        Ok(Self {
            path: path.to_path_buf(),
            file,
            rows,
            cols,
            dtype,
            data_offset,
        })
    }

    /// Rows `start..start + len` as an f32 `[len, cols]` tensor on `device`.
    pub fn read_rows(
        &mut self,
        start: usize,
        len: usize,
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        ensure!(
            start + len <= self.rows,
            "rows {start}..{} of a {}-row matrix",
            start + len,
            self.rows
        );
        let size = self.dtype.size_in_bytes();
        let mut bytes = vec![0u8; len * self.cols * size];
        self.file.seek(SeekFrom::Start(
            self.data_offset + (start * self.cols * size) as u64,
        ))?;
        self.file
            .read_exact(&mut bytes)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let shape = (len, self.cols);
        let values = match self.dtype {
            DType::F16 => Tensor::from_vec(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect::<Vec<f32>>(),
                shape,
                device,
            )?,
            DType::F64 => Tensor::from_vec(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect::<Vec<f32>>(),
                shape,
                device,
            )?,
            _ => Tensor::from_vec(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect::<Vec<f32>>(),
                shape,
                device,
            )?,
        };
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 5), }";
        assert_eq!(header_field(h, "descr"), Some("'<f4'"));
        assert_eq!(header_field(h, "fortran_order"), Some("False"));
        assert_eq!(header_field(h, "shape"), Some("3, 5"));
        assert_eq!(header_field("{'shape': (7,), }", "shape"), Some("7,"));
    }
}
