//! PNG drawing with plotters, from plain data: line charts (the training loss
//! and validation curves), confusion matrices and the similarity heat map.
//! This module depends on no other part of the crate; the trainer and the CLI
//! turn their results into series and matrices for it.
//!
//! plotters draws text with a TrueType font it is given. [`register_font`] is
//! the one font lookup: an explicit file, else `$SENTENCE_MTL_FONT`, else the
//! first of a few usual system fonts that exists. Charts with text fail with an
//! error saying so when there is none; the heat map can be drawn without text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The family every font is registered under.
const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 2] = [RGBColor(214, 39, 40), RGBColor(31, 119, 180)];

/// One line of a chart: its legend and its `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend's text.
    pub label: String,
    /// The points, in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// The mean of each point with the `window - 1` before it.
pub fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / window.min(i + 1) as f64)
        })
        .collect()
}

/// Draws `series` as lines on one chart (with markers when short) and
/// writes it to `path` as a PNG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> anyhow::Result<()> {
    require_font()?;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (x_min, x_max, y_max) = all.fold(
        (f64::INFINITY, f64::NEG_INFINITY, 0f64),
        |(a, b, c), &(x, y)| (a.min(x), b.max(x), c.max(y)),
    );
    let (x_min, x_max) = if x_min < x_max {
        (x_min, x_max)
    } else {
        (x_min - 1.0, x_min + 1.0)
    };
    let y_max = if y_max > 0.0 { y_max * 1.05 } else { 1.0 };
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .draw()
        .map_err(plot_err)?;
    for (i, Series { label, points }) in series.iter().enumerate() {
        // Series come grouped (a task's metrics together): the group picks
        // the colour, the place in the group the shade.
        let base = COLORS[i * COLORS.len() / series.len().max(1) % COLORS.len()];
        let shade = 1.0 - 0.3 * (i % (series.len() / COLORS.len()).max(1)) as f64;
        let color = RGBColor(
            (base.0 as f64 * shade) as u8,
            (base.1 as f64 * shade) as u8,
            (base.2 as f64 * shade) as u8,
        );
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))
            .map_err(plot_err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        if points.len() <= 30 {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(plot_err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Draws a confusion matrix, `counts[true][predicted]` for the classes named
/// by `names` (rows: true class, columns: predicted), each cell shaded by its
/// share of the row and labelled with its count.
pub fn confusion_matrix(
    path: &Path,
    title: &str,
    names: &[String],
    counts: &[Vec<u64>],
) -> anyhow::Result<()> {
    require_font()?;
    let n = counts.len();
    anyhow::ensure!(n >= 1, "an empty confusion matrix");
    anyhow::ensure!(
        names.len() == n && counts.iter().all(|row| row.len() == n),
        "a confusion matrix of {n} rows needs {n} class names and {n} columns per row"
    );
    // A segmented range a..b has a segment for each of a..=b: 0..n-1 gives n cells.
    let classes = 0..n - 1;
    let root =
        BitMapBackend::new(path, (200 + 110 * n as u32, 160 + 90 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(100)
        .build_cartesian_2d(classes.clone().into_segmented(), classes.into_segmented())
        .map_err(plot_err)?;
    // Row 0 (the first true class) is drawn at the top.
    let name_of = |v: &SegmentValue<usize>, flip: bool| match v {
        SegmentValue::CenterOf(i) if *i < n => names[if flip { n - 1 - i } else { *i }].clone(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("predicted")
        .y_desc("true")
        .x_labels(n)
        .y_labels(n)
        .x_label_formatter(&|v| name_of(v, false))
        .y_label_formatter(&|v| name_of(v, true))
        .label_style((FONT, 14))
        .draw()
        .map_err(plot_err)?;
    let cells = (0..n).flat_map(|t| (0..n).map(move |p| (t, p)));
    let share = |t: usize, p: usize| {
        let row: u64 = counts[t].iter().sum();
        if row == 0 {
            0.0
        } else {
            counts[t][p] as f64 / row as f64
        }
    };
    let cell = |t: usize| SegmentValue::Exact(n - 1 - t);
    chart
        .draw_series(cells.clone().map(|(t, p)| {
            let s = share(t, p);
            let color = RGBColor(
                (247.0 - 239.0 * s) as u8,
                (251.0 - 203.0 * s) as u8,
                (255.0 - 148.0 * s) as u8,
            );
            Rectangle::new(
                [
                    (SegmentValue::Exact(p), cell(t)),
                    (SegmentValue::Exact(p + 1), SegmentValue::Exact(n - t)),
                ],
                color.filled(),
            )
        }))
        .map_err(plot_err)?;
    chart
        .draw_series(cells.map(|(t, p)| {
            let color: &'static RGBColor = if share(t, p) > 0.5 { &WHITE } else { &BLACK };
            let style = TextStyle::from((FONT, 18).into_font())
                .color(color)
                .pos(text_anchor_center());
            Text::new(
                counts[t][p].to_string(),
                (SegmentValue::CenterOf(p), SegmentValue::CenterOf(n - 1 - t)),
                style,
            )
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn text_anchor_center() -> Pos {
    Pos::new(HPos::Center, VPos::Center)
}

fn plot_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e}")
}

/// Colour of a similarity in [-1, 1]: white at 0 and below, deep blue at 1.
fn colour(value: f32) -> RGBColor {
    let t = value.clamp(0.0, 1.0) as f64;
    let mix = |from: f64, to: f64| (from + (to - from) * t).round() as u8;
    RGBColor(mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0))
}

/// Draws a square similarity matrix as a heat map PNG: cells coloured by
/// value, with the values in the cells, `labels` beside the rows and the row
/// numbers `[i]` above the columns when `with_text` (which needs
/// [`register_font`] to have found a font).
pub fn heatmap(
    path: &Path,
    labels: &[String],
    matrix: &[Vec<f32>],
    with_text: bool,
) -> anyhow::Result<()> {
    let n = labels.len();
    anyhow::ensure!(n > 0, "no rows to draw");
    anyhow::ensure!(
        matrix.len() == n && matrix.iter().all(|row| row.len() == n),
        "a heat map of {n} labels needs an {n} x {n} matrix"
    );
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
                let style = (FONT, 18)
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
        let label = (FONT, 16).into_font().color(&BLACK);
        for (i, label_text) in labels.iter().enumerate() {
            let y = (top + CELL * i as u32 + CELL / 2) as i32;
            let style = label.clone().pos(Pos::new(HPos::Right, VPos::Center));
            root.draw(&Text::new(
                label_text.as_str(),
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

/// TrueType fonts looked for, in order (Debian's fonts-dejavu-core,
/// fonts-liberation and fonts-noto paths, then other systems').
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a TrueType font for plotters, once per process: `explicit` if
/// given, else `$SENTENCE_MTL_FONT`, else the first of the usual system fonts
/// that exists. `Ok(false)` when none is found; an `Err` for a font file that
/// cannot be read or used. Later calls return the first call's outcome.
pub fn register_font(explicit: Option<&Path>) -> anyhow::Result<bool> {
    static REGISTERED: OnceLock<Result<bool, String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let from_env = std::env::var_os("SENTENCE_MTL_FONT").map(PathBuf::from);
            let Some(path) = explicit.map(Path::to_path_buf).or(from_env).or_else(|| {
                FONT_CANDIDATES
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
            }) else {
                return Ok(false);
            };
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("reading font {}: {e}", path.display()))?;
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a usable TrueType font", path.display()))?;
            Ok(true)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A font for charts whose text cannot be left out.
fn require_font() -> anyhow::Result<()> {
    anyhow::ensure!(
        register_font(None).context("plots need a font")?,
        "plots need a font: no TrueType font found; set SENTENCE_MTL_FONT to a .ttf file \
         (e.g. DejaVuSans.ttf)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sentence-mtl-plots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn is_png(path: &Path) -> bool {
        std::fs::read(path)
            .map(|b| b.starts_with(b"\x89PNG"))
            .unwrap_or(false)
    }

    #[test]
    fn draws_a_line_chart_a_confusion_matrix_and_a_heat_map() {
        let dir = temp("draw");
        let raw: Vec<(f64, f64)> = (1..=40).map(|s| (s as f64, 1.5 / s as f64)).collect();
        let series = [
            Series {
                label: "emotion".into(),
                points: moving_average(&raw, 4),
            },
            Series {
                label: "sentiment".into(),
                points: raw.clone(),
            },
        ];
        let path = dir.join("loss.png");
        line_chart(&path, "loss", "step", "cross-entropy", &series).unwrap();
        assert!(is_png(&path));

        let names: Vec<String> = ["negative", "neutral", "positive"].map(String::from).into();
        let counts = vec![vec![3, 1, 0], vec![0, 2, 1], vec![1, 0, 4]];
        let path = dir.join("confusion.png");
        confusion_matrix(&path, "sentiment (test)", &names, &counts).unwrap();
        assert!(is_png(&path));
        let err = confusion_matrix(&path, "bad", &names[..2], &counts).unwrap_err();
        assert!(err.to_string().contains("needs 3 class names"), "{err}");

        let sentences: Vec<String> = ["a", "b"].map(String::from).into();
        let path = dir.join("heat.png");
        heatmap(&path, &sentences, &[vec![1.0, 0.2], vec![0.2, 1.0]], true).unwrap();
        assert!(is_png(&path));
        assert!(heatmap(&path, &sentences, &[vec![1.0]], false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn moving_average_averages_the_window_before_each_point() {
        let points = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)];
        assert_eq!(
            moving_average(&points, 2),
            vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]
        );
    }
}
