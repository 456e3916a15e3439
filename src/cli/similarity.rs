//! `sentence-mtl similarity`: the cosine-similarity matrix of sentences and a
//! table of named pairs (the notebook's Task 1), optionally drawn as a heat map.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::embed::{read_sentences, EncoderArgs};

/// The notebook's sentences, used when none are given.
pub const NOTEBOOK_SENTENCES: [&str; 5] = [
    "I love natural language processing.",
    "NLP is a fascinating field.",
    "The Eiffel Tower is in Paris.",
    "Transformers are used in deep learning.",
    "Paris is the capital of France.",
];

/// The notebook's pairs of [`NOTEBOOK_SENTENCES`].
pub const NOTEBOOK_PAIRS: [(usize, usize); 4] = [(0, 1), (0, 2), (2, 4), (1, 3)];

/// TrueType fonts looked for, in order, to label the heat map (Debian's
/// fonts-dejavu-core and fonts-liberation paths). Without one, the heat map is
/// drawn without text and the labels are printed on stdout instead.
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

#[derive(Debug, clap::Args)]
pub struct SimilarityArgs {
    /// Sentences to compare; if none, the notebook's five (or --file / stdin).
    pub sentences: Vec<String>,
    /// File with one sentence per line ("-" for stdin).
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Pairs to list, as I,J (0-based), e.g. `--pair 0,1 --pair 2,4`; default:
    /// the notebook's pairs for its sentences, every pair otherwise.
    #[arg(long = "pair", value_parser = parse_pair)]
    pub pairs: Vec<(usize, usize)>,
    /// Also draw the matrix as a heat map PNG.
    #[arg(long)]
    pub heatmap: Option<PathBuf>,
    /// TrueType font for the heat map's labels (default: a system font if found).
    #[arg(long)]
    pub font: Option<PathBuf>,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

fn parse_pair(text: &str) -> Result<(usize, usize), String> {
    let (i, j) = text
        .split_once(',')
        .ok_or_else(|| format!("{text:?} is not a pair I,J"))?;
    let index = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?} is not a sentence index"))
    };
    Ok((index(i)?, index(j)?))
}

pub fn run(args: SimilarityArgs) -> anyhow::Result<()> {
    let use_notebook = args.sentences.is_empty() && args.file.is_none();
    let sentences: Vec<String> = if use_notebook {
        NOTEBOOK_SENTENCES.iter().map(|s| s.to_string()).collect()
    } else {
        read_sentences(&args.sentences, args.file.as_deref())?
    };
    let pairs: Vec<(usize, usize)> = match (&args.pairs[..], use_notebook) {
        ([], true) => NOTEBOOK_PAIRS.to_vec(),
        ([], false) => (0..sentences.len())
            .flat_map(|i| (i + 1..sentences.len()).map(move |j| (i, j)))
            .collect(),
        (given, _) => given.to_vec(),
    };
    if let Some(&(i, j)) = pairs
        .iter()
        .find(|(i, j)| *i >= sentences.len() || *j >= sentences.len())
    {
        bail!(
            "pair ({i}, {j}) names a sentence beyond the {} given (indices start at 0)",
            sentences.len()
        );
    }

    let encoder = args.encoder.load()?;
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let embeddings = encoder.encode(&texts)?;
    let matrix = crate::ops::cosine_similarity_matrix(&embeddings, &embeddings)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;

    print!("{}", format_report(&sentences, &matrix, &pairs));
    if let Some(path) = &args.heatmap {
        let font = load_font(args.font.as_deref())?;
        draw_heatmap(path, &sentences, &matrix, font)?;
        eprintln!("heat map written to {}", path.display());
    }
    Ok(())
}

/// The sentences, the matrix and the pairs as plain-text tables.
pub fn format_report(
    sentences: &[String],
    matrix: &[Vec<f32>],
    pairs: &[(usize, usize)],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "Sentences:");
    for (i, s) in sentences.iter().enumerate() {
        let _ = writeln!(out, "  [{i}] {s}");
    }
    let _ = writeln!(out, "\nCosine similarity:");
    let _ = write!(out, "{:>6}", "");
    for j in 0..sentences.len() {
        let _ = write!(out, "{:>8}", format!("[{j}]"));
    }
    let _ = writeln!(out);
    for (i, row) in matrix.iter().enumerate() {
        let _ = write!(out, "{:>6}", format!("[{i}]"));
        for value in row {
            let _ = write!(out, "{value:>8.4}");
        }
        let _ = writeln!(out);
    }
    if !pairs.is_empty() {
        let _ = writeln!(out, "\nPairs:");
        let _ = writeln!(
            out,
            "  {:>10}  {:<45}  sentence B",
            "similarity", "sentence A"
        );
        for &(i, j) in pairs {
            let _ = writeln!(
                out,
                "  {:>10.4}  {:<45}  {}",
                matrix[i][j],
                shorten(&format!("[{i}] {}", sentences[i]), 45),
                shorten(&format!("[{j}] {}", sentences[j]), 45)
            );
        }
    }
    out
}

/// At most `max` characters, with an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let kept: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}

/// Registers a TrueType font with plotters under the family "sans-serif";
/// `Ok(false)` when no font was given and none of [`FONT_CANDIDATES`] exists.
fn load_font(explicit: Option<&Path>) -> anyhow::Result<bool> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => match FONT_CANDIDATES.iter().map(Path::new).find(|p| p.is_file()) {
            Some(path) => path.to_path_buf(),
            None => {
                eprintln!(
                    "no TrueType font found (looked for {}): drawing the heat map without text; \
                     the table above gives the labels. Install fonts-dejavu-core or pass --font.",
                    FONT_CANDIDATES.join(", ")
                );
                return Ok(false);
            }
        },
    };
    let bytes =
        std::fs::read(&path).with_context(|| format!("cannot read font {}", path.display()))?;
    // plotters keeps registered fonts for the whole process: leaking once is what it asks for.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", path.display()))?;
    Ok(true)
}

/// Colour of a similarity in [-1, 1]: white at 0 and below, deep blue at 1.
fn colour(value: f32) -> RGBColor {
    let t = value.clamp(0.0, 1.0) as f64;
    let mix = |from: f64, to: f64| (from + (to - from) * t).round() as u8;
    RGBColor(mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0))
}

/// Draws the matrix as a heat map PNG: cells coloured by similarity, with the
/// values in the cells and sentence labels when `with_text`.
pub fn draw_heatmap(
    path: &Path,
    sentences: &[String],
    matrix: &[Vec<f32>],
    with_text: bool,
) -> anyhow::Result<()> {
    let n = sentences.len();
    if n == 0 {
        bail!("no sentences to draw");
    }
    const CELL: u32 = 72;
    let label_width: u32 = if with_text { 360 } else { 8 };
    let top: u32 = if with_text { 40 } else { 8 };
    let size = (
        label_width + CELL * n as u32 + 16,
        top + CELL * n as u32 + 16,
    );
    let root = BitMapBackend::new(path, size).into_drawing_area();
    let draw_err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(draw_err)?;

    for (i, row) in matrix.iter().enumerate() {
        for (j, &value) in row.iter().enumerate() {
            let x = (label_width + CELL * j as u32) as i32;
            let y = (top + CELL * i as u32) as i32;
            let cell = [(x, y), (x + CELL as i32, y + CELL as i32)];
            root.draw(&Rectangle::new(cell, colour(value).filled()))
                .map_err(draw_err)?;
            root.draw(&Rectangle::new(cell, BLACK.mix(0.15)))
                .map_err(draw_err)?;
            if with_text {
                let ink = if value > 0.55 { WHITE } else { BLACK };
                let style = ("sans-serif", 18)
                    .into_font()
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                root.draw(&Text::new(
                    format!("{value:.2}"),
                    (x + CELL as i32 / 2, y + CELL as i32 / 2),
                    style,
                ))
                .map_err(draw_err)?;
            }
        }
    }
    if with_text {
        let label = ("sans-serif", 16).into_font().color(&BLACK);
        for (i, sentence) in sentences.iter().enumerate() {
            let y = (top + CELL * i as u32 + CELL / 2) as i32;
            let style = label.clone().pos(Pos::new(HPos::Right, VPos::Center));
            root.draw(&Text::new(
                shorten(&format!("[{i}] {sentence}"), 40),
                (label_width as i32 - 8, y),
                style,
            ))
            .map_err(draw_err)?;
            let x = (label_width + CELL * i as u32 + CELL / 2) as i32;
            let style = label.clone().pos(Pos::new(HPos::Center, VPos::Bottom));
            root.draw(&Text::new(format!("[{i}]"), (x, top as i32 - 8), style))
                .map_err(draw_err)?;
        }
    }
    root.present().map_err(draw_err)?;
    Ok(())
}
