//! PNG plots with plotters: the training loss of each head, the validation
//! metrics per epoch, overfit mode's accuracy, and confusion matrices.
//!
//! plotters draws text with a TrueType font it is given: the first of
//! `$SENTENCE_MTL_FONT` and a few usual system fonts that exists. Without one,
//! drawing fails with an error saying so (the trainer then carries on without
//! plots).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;

use super::evaluate::TaskEval;
use super::metrics::TaskMetrics;
use super::trainer::{OverfitReport, TrainState};

const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 2] = [RGBColor(214, 39, 40), RGBColor(31, 119, 180)];

/// Writes `loss.png`, `val_metrics.png` (when an epoch ended) and, in overfit
/// mode, `overfit_accuracy.png` into `out`; returns the files written.
pub fn training_plots(
    out: &Path,
    tasks: &[String; 2],
    state: &TrainState,
    overfit: Option<&OverfitReport>,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    if !state.steps.is_empty() {
        let series: Vec<(String, Vec<(f64, f64)>)> = (0..2)
            .map(|h| {
                let raw: Vec<(f64, f64)> = state
                    .steps
                    .iter()
                    .filter_map(|s| s.loss[h].map(|l| (s.step as f64, l as f64)))
                    .collect();
                (
                    format!("{} (head {})", tasks[h], ["A", "B"][h]),
                    moving_average(&raw, (raw.len() / 50).max(1)),
                )
            })
            .collect();
        let path = out.join("loss.png");
        line_chart(
            &path,
            "Training loss per head (moving average)",
            "step",
            "cross-entropy",
            &series,
        )?;
        written.push(path);
    }
    if !state.epochs.is_empty() {
        let mut series = Vec::new();
        for (h, task) in tasks.iter().enumerate() {
            for (metric, get) in [
                (
                    "accuracy",
                    (|m: &TaskMetrics| m.accuracy) as fn(&TaskMetrics) -> f64,
                ),
                ("macro-F1", |m| m.macro_f1),
                ("macro-recall", |m| m.macro_recall),
            ] {
                let points = state
                    .epochs
                    .iter()
                    .map(|e| (e.epoch as f64, get(&e.val[h])))
                    .collect();
                series.push((format!("{task} {metric}"), points));
            }
        }
        let path = out.join("val_metrics.png");
        line_chart(
            &path,
            "Validation metrics per epoch",
            "epoch",
            "score",
            &series,
        )?;
        written.push(path);
    }
    if let Some(report) = overfit {
        let series: Vec<(String, Vec<(f64, f64)>)> = (0..2)
            .map(|h| {
                // Step 0 is the batch before training.
                let after_steps = report
                    .accuracy
                    .iter()
                    .enumerate()
                    .map(|(i, a)| ((i + 1) as f64, a[h]));
                let points = std::iter::once((0.0, report.initial_accuracy[h]))
                    .chain(after_steps)
                    .collect();
                (format!("{} accuracy", tasks[h]), points)
            })
            .collect();
        let path = out.join("overfit_accuracy.png");
        line_chart(
            &path,
            "Overfit batch: accuracy after each step",
            "step",
            "accuracy",
            &series,
        )?;
        written.push(path);
    }
    Ok(written)
}

/// The mean of each point with the `window - 1` before it.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
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

fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    ensure_font()?;
    let all = series.iter().flat_map(|(_, p)| p.iter());
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
    for (i, (label, points)) in series.iter().enumerate() {
        // Two tasks, several metrics each: the task picks the colour, the
        // metric the shade.
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

/// Draws a task's confusion matrix (rows: true class, columns: predicted),
/// each cell shaded by its share of the row and labelled with its count.
pub fn confusion_matrix(path: &Path, title: &str, eval: &TaskEval) -> anyhow::Result<()> {
    ensure_font()?;
    let n = eval.confusion.num_classes();
    anyhow::ensure!(n >= 1, "an empty confusion matrix");
    let names = &eval.label_names;
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
        let row: u64 = eval.confusion.counts[t].iter().sum();
        if row == 0 {
            0.0
        } else {
            eval.confusion.counts[t][p] as f64 / row as f64
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
                eval.confusion.counts[t][p].to_string(),
                (SegmentValue::CenterOf(p), SegmentValue::CenterOf(n - 1 - t)),
                style,
            )
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn text_anchor_center() -> plotters::style::text_anchor::Pos {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    Pos::new(HPos::Center, VPos::Center)
}

fn plot_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e}")
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a TrueType font as "sans-serif" for plotters, once.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let from_env = std::env::var_os("SENTENCE_MTL_FONT").map(PathBuf::from);
            let path = from_env.into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from)).find(|p| p.is_file()).ok_or_else(
                || "no TrueType font found: set SENTENCE_MTL_FONT to a .ttf file (e.g. DejaVuSans.ttf)".to_string(),
            )?;
            let bytes = std::fs::read(&path).map_err(|e| format!("reading font {}: {e}", path.display()))?;
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FONT, FontStyle::Normal, bytes).map_err(|_| format!("{} is not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(anyhow::Error::msg)
        .context("plots need a font")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics::ConfusionMatrix;
    use crate::train::trainer::StepRecord;

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
    fn draws_loss_curves_and_a_confusion_matrix() {
        let dir = temp("draw");
        let steps = (1..=40)
            .map(|step| StepRecord {
                step,
                epoch: 1,
                loss: [
                    Some(1.5 / step as f32),
                    (step % 3 != 0).then_some(1.0 / step as f32),
                ],
                total: 2.0,
                lr_factor: 1.0,
                grad_norm: None,
            })
            .collect();
        let state = TrainState {
            global_step: 40,
            steps,
            epochs: Vec::new(),
            train_seconds: 1.0,
        };
        let written =
            training_plots(&dir, &["emotion".into(), "sentiment".into()], &state, None).unwrap();
        assert_eq!(written, vec![dir.join("loss.png")]);
        assert!(is_png(&written[0]));

        let confusion = ConfusionMatrix::new(3, &[0, 1, 2, 2, 1], &[0, 2, 2, 2, 1]).unwrap();
        let eval = TaskEval {
            task: "sentiment".into(),
            label_names: vec!["negative".into(), "neutral".into(), "positive".into()],
            metrics: confusion.metrics(),
            loss: 0.5,
            confusion,
        };
        let path = dir.join("confusion.png");
        confusion_matrix(&path, "sentiment (test)", &eval).unwrap();
        assert!(is_png(&path));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
