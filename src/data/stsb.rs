//! The STS benchmark's files: `stsb-en-{train,dev,test}.csv`, each line
//! `sentence1,sentence2,score` in CSV (Excel dialect, quoted where needed), no
//! header, the score a human rating from 0 (unrelated) to 5 (same meaning).
//!
//! A file that is missing, empty, not UTF-8, or has a line that is not three
//! fields with a finite score is a [`DataError`] naming the file and the line.

use std::path::{Path, PathBuf};

use super::tweeteval::{DataError, Split};

/// One rated sentence pair.
#[derive(Debug, Clone, PartialEq)]
pub struct StsPair {
    /// The first sentence.
    pub sentence1: String,
    /// The second sentence.
    pub sentence2: String,
    /// The human similarity rating, 0 to 5.
    pub score: f64,
}

/// The file of one split in an STS-B folder: `stsb-en-train.csv`,
/// `stsb-en-dev.csv` (for [`Split::Val`]) or `stsb-en-test.csv`.
pub fn stsb_split_path(dir: &Path, split: Split) -> PathBuf {
    let name = match split {
        Split::Train => "train",
        Split::Val => "dev",
        Split::Test => "test",
    };
    dir.join(format!("stsb-en-{name}.csv"))
}

/// Reads one split of the STS-B folder `dir` (see [`stsb_split_path`]).
pub fn load_stsb(dir: &Path, split: Split) -> Result<Vec<StsPair>, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Missing {
            path: dir.to_path_buf(),
            what: "the STS-B folder".into(),
        });
    }
    read_stsb_csv(&stsb_split_path(dir, split))
}

/// Reads an STS-B CSV file: every line a pair, in file order.
pub fn read_stsb_csv(path: &Path) -> Result<Vec<StsPair>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing {
            path: path.to_path_buf(),
            what: "an STS-B split file".into(),
        },
        _ => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut pairs = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line() as usize;
        let bad = |reason: String| DataError::BadRecord {
            path: path.to_path_buf(),
            line,
            reason,
        };
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                return Err(match e.kind() {
                    csv::ErrorKind::Utf8 { pos, .. } => DataError::NotUtf8 {
                        path: path.to_path_buf(),
                        line: pos.as_ref().map_or(line, |p| p.line() as usize),
                    },
                    _ => bad(e.to_string()),
                })
            }
        }
        if record.len() != 3 {
            return Err(bad(format!(
                "{} fields; a pair is 3: sentence1,sentence2,score",
                record.len()
            )));
        }
        let score: f64 = record[2]
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite())
            .ok_or_else(|| bad(format!("score {:?} is not a finite number", &record[2])))?;
        pairs.push(StsPair {
            sentence1: record[0].to_string(),
            sentence2: record[1].to_string(),
            score,
        });
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stsb-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pairs.csv");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn quoted_fields_keep_their_commas_and_quotes() {
        let path = write(
            "quoted",
            b"A man plays.,\"He said, \"\"hi\"\".\",3.8\r\nx,y,0\n",
        );
        let pairs = read_stsb_csv(&path).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].sentence2, "He said, \"hi\".");
        assert_eq!(pairs[0].score, 3.8);
        assert_eq!(pairs[1].score, 0.0);
    }

    #[test]
    fn a_bad_line_is_an_error_naming_its_line() {
        let path = write("fields", b"a,b,1\na,b\n");
        let err = read_stsb_csv(&path).unwrap_err().to_string();
        assert!(err.contains(":2:") && err.contains("2 fields"), "{err}");
        let path = write("score", b"a,b,1\na,b,1\na,b,high\n");
        let err = read_stsb_csv(&path).unwrap_err().to_string();
        assert!(err.contains(":3:") && err.contains("\"high\""), "{err}");
        let path = write("nan", b"a,b,NaN\n");
        assert!(read_stsb_csv(&path).is_err());
    }

    #[test]
    fn empty_missing_and_non_utf8_files_are_errors() {
        let empty = write("empty", b"\xEF\xBB\xBF\n");
        assert!(matches!(
            read_stsb_csv(&empty),
            Err(DataError::Empty { .. })
        ));
        let missing = empty.with_file_name("absent.csv");
        assert!(matches!(
            read_stsb_csv(&missing),
            Err(DataError::Missing { .. })
        ));
        let latin1 = write("latin1", b"a,b,1\ncaf\xE9,b,2\n");
        match read_stsb_csv(&latin1) {
            Err(DataError::NotUtf8 { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected NotUtf8, got {other:?}"),
        }
    }
}
