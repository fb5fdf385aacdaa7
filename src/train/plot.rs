//! A dependency-free SVG line chart, enough for the training stage's loss curve (train
//! and eval loss against step) next to `metrics.jsonl`.
//!
//! The output is byte-for-byte deterministic: every number is written with a fixed
//! precision by Rust's formatter, which is locale-independent and correctly rounded, so
//! the picture can live in a content-addressed run directory without churning hashes.

use std::fmt::Write as _;

/// One named series of (x, y) points.
///
/// A series whose label contains `eval` (any case) is drawn as a marker at each point:
/// evaluation is sparse, and a line between two evals would suggest measurements that
/// were never made. Every other series is a polyline. Points with a NaN or infinite
/// coordinate are skipped.
pub struct Series<'a> {
    /// Legend text; XML-escaped on output.
    pub label: &'a str,
    /// The points in drawing order (normally ascending x).
    pub points: &'a [(f64, f64)],
    /// Any SVG paint, e.g. `#1f77b4` or `crimson`; XML-escaped on output.
    pub color: &'a str,
}

/// The canvas, in SVG user units.
const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
/// A polyline keeps at most this many points, so a long run's picture stays small
/// (about 12 bytes a point) and renders fast.
const MAX_LINE_POINTS: usize = 2000;
/// Roughly how many ticks an axis aims for; `nice_ticks` lands between 3 and 7.
const TARGET_TICKS: f64 = 6.0;
/// Text widths are estimated, not measured (no font metrics without a dependency):
/// an average sans-serif glyph is at most this many font-sizes wide.
const GLYPH_WIDTH: f64 = 0.6;
const TICK_FONT: f64 = 12.0;
const LEGEND_FONT: f64 = 13.0;
const MARKER_RADIUS: f64 = 3.5;

/// Renders series as an SVG line chart with axes, "nice" tick labels (1-2-5 steps), axis
/// titles, a legend and a title, in an 800×480 view box.
///
/// The axes fit all finite points of all series with a little padding; a degenerate range
/// (one point, or a constant series) is widened so the point sits mid-axis. With no
/// finite points at all the axes are still drawn, over a "no data" note. Polylines of more
/// than 2000 points are downsampled by averaging consecutive buckets.
pub fn line_chart_svg(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    // Finite points only: one NaN would otherwise poison the ranges and the path data.
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = || finite.iter().flatten();
    let has_data = all().next().is_some();
    let (x_lo, x_hi) = padded_range(all().map(|p| p.0), 0.03);
    let (y_lo, y_hi) = padded_range(all().map(|p| p.1), 0.06);
    let x_ticks = nice_ticks(x_lo, x_hi);
    let y_ticks = nice_ticks(y_lo, y_hi);
    let x_tick_labels = tick_labels(&x_ticks, x_lo, x_hi);
    let y_tick_labels = tick_labels(&y_ticks, y_lo, y_hi);

    // Layout, top to bottom: title, legend rows, plot, x tick labels, x-axis title. The
    // left margin grows with the widest y tick label so it never runs into the y title.
    let widest_y_label = y_tick_labels.iter().map(|l| l.chars().count()).max();
    let left = (34.0 + widest_y_label.unwrap_or(0) as f64 * TICK_FONT * GLYPH_WIDTH).max(64.0);
    let right = WIDTH - 24.0;
    let legend = legend_layout(series, left, right);
    let legend_rows = legend.iter().map(|item| item.row + 1).max().unwrap_or(0);
    let top = 46.0 + legend_rows as f64 * 20.0 + 8.0;
    let bottom = HEIGHT - 56.0;
    let plot = Plot {
        left,
        right,
        top,
        bottom,
        x_lo,
        x_hi,
        y_lo,
        y_hi,
    };

    // `write!` into a String cannot fail, hence the `let _ =` throughout.
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\">",
        w = WIDTH,
        h = HEIGHT
    );
    let _ = writeln!(
        svg,
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"30\" font-size=\"18\" font-weight=\"bold\" \
         text-anchor=\"middle\">{}</text>",
        num(WIDTH / 2.0),
        escape(title)
    );

    // Grid first so the data is drawn over it.
    svg.push_str("<g stroke=\"#e0e0e0\" stroke-width=\"1\">\n");
    for &t in &x_ticks {
        let x = num(plot.x(t));
        let _ = writeln!(
            svg,
            "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/>",
            num(top),
            num(bottom)
        );
    }
    for &t in &y_ticks {
        let y = num(plot.y(t));
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\"/>",
            num(left),
            num(right)
        );
    }
    svg.push_str("</g>\n");

    // Tick labels.
    let _ = writeln!(
        svg,
        "<g font-size=\"{}\" fill=\"#333\" text-anchor=\"middle\">",
        TICK_FONT
    );
    for (&t, label) in x_ticks.iter().zip(&x_tick_labels) {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\">{}</text>",
            num(plot.x(t)),
            num(bottom + 18.0),
            escape(label)
        );
    }
    svg.push_str("</g>\n");
    let _ = writeln!(
        svg,
        "<g font-size=\"{}\" fill=\"#333\" text-anchor=\"end\">",
        TICK_FONT
    );
    for (&t, label) in y_ticks.iter().zip(&y_tick_labels) {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\">{}</text>",
            num(left - 7.0),
            // Baseline a third of the font below the tick, so the digits centre on it.
            num(plot.y(t) + TICK_FONT / 3.0),
            escape(label)
        );
    }
    svg.push_str("</g>\n");

    // Axis titles.
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" font-size=\"14\" text-anchor=\"middle\">{}</text>",
        num((left + right) / 2.0),
        num(HEIGHT - 14.0),
        escape(x_label)
    );
    let (yx, yy) = (18.0, (top + bottom) / 2.0);
    let _ = writeln!(
        svg,
        "<text x=\"{x}\" y=\"{y}\" font-size=\"14\" text-anchor=\"middle\" \
         transform=\"rotate(-90 {x} {y})\">{}</text>",
        escape(y_label),
        x = num(yx),
        y = num(yy)
    );

    // The data.
    for (s, points) in series.iter().zip(&finite) {
        let color = escape(s.color);
        if is_sparse(s) || points.len() == 1 {
            markers(&mut svg, &plot, points, &color);
        } else if !points.is_empty() {
            let points = downsample(points, MAX_LINE_POINTS);
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" \
                 stroke-linejoin=\"round\" points=\""
            );
            for (i, &(x, y)) in points.iter().enumerate() {
                if i > 0 {
                    svg.push(' ');
                }
                let _ = write!(svg, "{},{}", num(plot.x(x)), num(plot.y(y)));
            }
            svg.push_str("\"/>\n");
        }
    }

    // The frame goes over the data so a point on the padding's edge cannot hide the axis.
    let _ = writeln!(
        svg,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\" \
         stroke-width=\"1\"/>",
        num(left),
        num(top),
        num(right - left),
        num(bottom - top)
    );
    if !has_data {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"16\" fill=\"#888\" \
             text-anchor=\"middle\">no data</text>",
            num((left + right) / 2.0),
            num((top + bottom) / 2.0)
        );
    }

    // Legend: a line swatch for polylines, a marker for sparse series.
    let _ = writeln!(svg, "<g font-size=\"{}\">", LEGEND_FONT);
    for item in &legend {
        let s = &series[item.index];
        let color = escape(s.color);
        let y = 46.0 + item.row as f64 * 20.0;
        if is_sparse(s) {
            let _ = writeln!(
                svg,
                "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{color}\"/>",
                num(item.x + 11.0),
                num(y),
                num(MARKER_RADIUS)
            );
        } else {
            let _ = writeln!(
                svg,
                "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{color}\" \
                 stroke-width=\"2\"/>",
                num(item.x),
                num(item.x + 22.0),
                y = num(y)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\">{}</text>",
            num(item.x + 28.0),
            num(y + LEGEND_FONT / 3.0),
            escape(s.label)
        );
    }
    svg.push_str("</g>\n</svg>\n");
    svg
}

/// Whether a series is drawn as markers only (see [`Series`]).
fn is_sparse(series: &Series<'_>) -> bool {
    series.label.to_ascii_lowercase().contains("eval")
}

/// Data-to-canvas mapping of the plot area.
struct Plot {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    x_lo: f64,
    x_hi: f64,
    y_lo: f64,
    y_hi: f64,
}

impl Plot {
    fn x(&self, x: f64) -> f64 {
        self.left + (x - self.x_lo) / (self.x_hi - self.x_lo) * (self.right - self.left)
    }

    // SVG's y grows downwards.
    fn y(&self, y: f64) -> f64 {
        self.bottom - (y - self.y_lo) / (self.y_hi - self.y_lo) * (self.bottom - self.top)
    }
}

fn markers(svg: &mut String, plot: &Plot, points: &[(f64, f64)], color: &str) {
    for &(x, y) in points {
        let _ = writeln!(
            svg,
            "<circle cx=\"{}\" cy=\"{}\" r=\"{}\" fill=\"{color}\" stroke=\"white\" \
             stroke-width=\"1\"/>",
            num(plot.x(x)),
            num(plot.y(y)),
            num(MARKER_RADIUS)
        );
    }
}

/// One legend entry's position: its series, its row and its left edge.
struct LegendItem {
    index: usize,
    row: usize,
    x: f64,
}

/// Lays legend entries out left to right above the plot, wrapping into more rows when
/// they do not fit; above the plot rather than inside it, so it can never cover a curve.
/// Each row is centred over the plot.
fn legend_layout(series: &[Series<'_>], left: f64, right: f64) -> Vec<LegendItem> {
    let width = |s: &Series<'_>| 28.0 + s.label.chars().count() as f64 * LEGEND_FONT * GLYPH_WIDTH;
    let gap = 24.0;
    let mut rows: Vec<Vec<(usize, f64)>> = Vec::new();
    let mut used = f64::INFINITY;
    for (index, s) in series.iter().enumerate() {
        let w = width(s);
        if used + gap + w > right - left || rows.is_empty() {
            rows.push(Vec::new());
            used = -gap;
        }
        let row = rows.last_mut().expect("a row was just pushed");
        row.push((index, w));
        used += gap + w;
    }
    let mut items = Vec::new();
    for (row, entries) in rows.iter().enumerate() {
        let total: f64 =
            entries.iter().map(|e| e.1).sum::<f64>() + gap * (entries.len() - 1) as f64;
        let mut x = ((left + right - total) / 2.0).max(left);
        for &(index, w) in entries {
            items.push(LegendItem { index, row, x });
            x += w + gap;
        }
    }
    items
}

/// The range of `values` widened by `fraction` of its span on each side; a single value
/// gets a made-up span around it, and no values at all give 0..1, so the caller always
/// has a non-empty range to divide by.
fn padded_range(values: impl Iterator<Item = f64>, fraction: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    // A span that overflows (values near ±f64::MAX) cannot be drawn proportionally;
    // fall back to the degenerate case around the midpoint rather than divide by inf.
    if span > 0.0 && span.is_finite() {
        let pad = span * fraction;
        return (lo - pad, hi + pad);
    }
    let mid = lo / 2.0 + hi / 2.0;
    let half = if mid == 0.0 { 1.0 } else { mid.abs() * 0.1 };
    (mid - half, mid + half)
}

/// Tick spacing for `lo..hi`: the smallest 1, 2 or 5 × 10^e at or above a sixth of the
/// span, returned as (mantissa, exponent) so ticks can be built from integers and an
/// exact power of ten instead of accumulating a rounded step.
fn nice_step(lo: f64, hi: f64) -> (f64, i32) {
    let raw = (hi - lo) / TARGET_TICKS;
    let mut exponent = raw.log10().floor() as i32;
    let mut mantissa = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        // The tolerance keeps a raw step of exactly 2 from rounding up to 5.
        .find(|&m| m * pow10(exponent) >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0);
    if mantissa == 10.0 {
        mantissa = 1.0;
        exponent += 1;
    }
    (mantissa, exponent)
}

/// The "nice" tick values (multiples of a 1-2-5 step) inside `lo..=hi`, ascending.
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Vec::new();
    }
    let (mantissa, exponent) = nice_step(lo, hi);
    let step = mantissa * pow10(exponent);
    // k·m·10^e computed as (k·m)·10^e or (k·m)/10^-e: k·m is an exact integer and
    // 10^|e| an exact power for reasonable e, so each tick is correctly rounded (0.3,
    // not 0.30000000000000004).
    let tick = |k: f64| {
        if exponent >= 0 {
            k * mantissa * pow10(exponent)
        } else {
            k * mantissa / pow10(-exponent)
        }
    };
    let first = (lo / step - 1e-9).ceil();
    let last = (hi / step + 1e-9).floor();
    if last < first {
        return Vec::new();
    }
    // The step is at least a sixth of the span, so there are at most 7 ticks; the cap
    // only guards against float surprises at extreme magnitudes.
    let count = ((last - first) as usize + 1).min(16);
    // `+ 0.0` turns a -0 (from ceil of a small negative) into 0, so it prints as "0".
    (0..count).map(|i| tick(first + i as f64) + 0.0).collect()
}

fn pow10(exponent: i32) -> f64 {
    10f64.powi(exponent)
}

/// Labels for ticks from `nice_ticks(lo, hi)`, all with the step's precision, so that
/// 0.5-spaced ticks read 2.0, 2.5, 3.0. Axes reaching 10 000 use a k suffix (1 000 000:
/// M) so that step counts stay short: 0, 5k, 10k.
fn tick_labels(ticks: &[f64], lo: f64, hi: f64) -> Vec<String> {
    if ticks.is_empty() {
        return Vec::new();
    }
    let (_, exponent) = nice_step(lo, hi);
    let max_abs = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let (scale, suffix) = if max_abs >= 1e6 {
        (6, "M")
    } else if max_abs >= 1e4 {
        (3, "k")
    } else {
        (0, "")
    };
    let decimals = (scale - exponent).max(0) as usize;
    ticks
        .iter()
        .map(|&t| {
            let v = t / pow10(scale) + 0.0;
            // A bare 0 reads better than "0k" at the origin of a step axis.
            if v == 0.0 && !suffix.is_empty() {
                "0".to_string()
            } else {
                format!("{v:.decimals$}{suffix}")
            }
        })
        .collect()
}

/// Averages consecutive runs of points into at most `max` buckets (bucket sizes differ by
/// at most one), so a long curve keeps its shape and level at a bounded size. Averaging
/// rather than picking every n-th point also smooths step-to-step noise, which is what
/// one wants from a 100k-step loss curve anyway.
fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max == 0 {
        return points.to_vec();
    }
    let n = points.len();
    (0..max)
        .map(|b| {
            let bucket = &points[b * n / max..(b + 1) * n / max];
            let len = bucket.len() as f64;
            let (sx, sy) = bucket
                .iter()
                .fold((0.0, 0.0), |(sx, sy), &(x, y)| (sx + x, sy + y));
            (sx / len, sy / len)
        })
        .collect()
}

/// A canvas coordinate: one decimal is a tenth of a pixel at 1:1, finer than anyone can
/// see, and keeps the file small. `+ 0.0` avoids printing "-0.0".
fn num(v: f64) -> String {
    let v = (v * 10.0).round() / 10.0 + 0.0;
    format!("{v:.1}")
}

/// Escapes text for both element content and double-quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAIN: &str = "#1f77b4";
    const EVAL: &str = "#d62728";

    /// A plausible loss curve: exponential decay from ~11 towards ~2.2 with a little
    /// deterministic noise (a fixed LCG, so the test data never changes).
    fn loss_curve(steps: u64, every: u64, noise: f64) -> Vec<(f64, f64)> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..=steps)
            .step_by(every as usize)
            .map(|step| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let jitter = ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * noise;
                let step = step as f64;
                (
                    step,
                    2.2 + 8.8 * (-step / (steps as f64 / 12.0)).exp() + jitter,
                )
            })
            .collect()
    }

    /// Checks that every element is closed in order; self-closing tags need nothing.
    /// Attribute values are escaped, so a `>` always ends a tag.
    fn assert_balanced(svg: &str) {
        let mut stack = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').expect("unterminated tag") + open;
            let tag = &rest[open + 1..close];
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            if tag.starts_with('/') {
                assert_eq!(stack.pop(), Some(name), "mismatched close tag");
            } else if !tag.ends_with('/') {
                stack.push(name);
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed tags: {stack:?}");
    }

    fn count(svg: &str, needle: &str) -> usize {
        svg.matches(needle).count()
    }

    /// The coordinates of the first polyline.
    fn polyline_points(svg: &str) -> Vec<(f64, f64)> {
        let start = svg.find("<polyline").expect("a polyline");
        let attr = &svg[start..];
        let attr = &attr[attr.find("points=\"").unwrap() + 8..];
        let attr = &attr[..attr.find('"').unwrap()];
        attr.split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect()
    }

    fn train_and_eval<'a>(train: &'a [(f64, f64)], eval: &'a [(f64, f64)]) -> [Series<'a>; 2] {
        [
            Series {
                label: "train",
                points: train,
                color: TRAIN,
            },
            Series {
                label: "eval",
                points: eval,
                color: EVAL,
            },
        ]
    }

    #[test]
    fn draws_train_as_a_polyline_and_eval_as_markers() {
        let train = loss_curve(1000, 1, 0.3);
        let eval = loss_curve(1000, 200, 0.0);
        let svg = line_chart_svg("Loss", "step", "loss", &train_and_eval(&train, &eval));
        assert!(svg.starts_with("<svg"));
        assert!(svg.ends_with("</svg>\n"));
        assert_balanced(&svg);
        assert_eq!(count(&svg, "<polyline"), 1);
        assert_eq!(polyline_points(&svg).len(), train.len());
        // One marker per eval point plus the eval legend swatch.
        assert_eq!(count(&svg, "<circle"), eval.len() + 1);
        for text in [
            ">Loss</text>",
            ">step</text>",
            ">loss</text>",
            ">train</text>",
            ">eval</text>",
        ] {
            assert!(svg.contains(text), "missing {text}");
        }
    }

    #[test]
    fn output_is_deterministic() {
        let train = loss_curve(5000, 1, 0.3);
        let eval = loss_curve(5000, 500, 0.0);
        let series = train_and_eval(&train, &eval);
        let first = line_chart_svg("Loss", "step", "loss", &series);
        assert_eq!(first, line_chart_svg("Loss", "step", "loss", &series));
        // Fixed precision everywhere: no float Debug noise like 0.30000000000000004.
        assert!(!first.contains("0000000"));
    }

    #[test]
    fn skips_nan_and_infinite_points() {
        let train = [
            (0.0, 10.0),
            (1.0, f64::NAN),
            (2.0, 8.0),
            (f64::INFINITY, 7.0),
            (4.0, f64::NEG_INFINITY),
            (5.0, 6.0),
        ];
        let eval = [(0.0, 10.5), (5.0, f64::NAN)];
        let svg = line_chart_svg("Loss", "step", "loss", &train_and_eval(&train, &eval));
        assert_balanced(&svg);
        assert_eq!(polyline_points(&svg).len(), 3);
        assert_eq!(count(&svg, "<circle"), 1 + 1);
        let lower = svg.to_ascii_lowercase();
        assert!(!lower.contains("nan") && !lower.contains("inf"));
    }

    #[test]
    fn escapes_labels_and_colors() {
        let points = [(0.0, 1.0), (1.0, 2.0)];
        let series = [Series {
            label: "a<b & c>d \"q\"",
            points: &points,
            color: "red\"/><script>",
        }];
        let svg = line_chart_svg("<title> & co", "x<", "y&", &series);
        assert_balanced(&svg);
        assert!(svg.contains(">a&lt;b &amp; c&gt;d &quot;q&quot;</text>"));
        assert!(svg.contains(">&lt;title&gt; &amp; co</text>"));
        assert!(svg.contains(">x&lt;</text>") && svg.contains(">y&amp;</text>"));
        assert!(svg.contains("stroke=\"red&quot;/&gt;&lt;script&gt;\""));
        assert!(!svg.contains("<script") && !svg.contains("<b"));
    }

    #[test]
    fn empty_input_draws_axes_and_says_no_data() {
        for series in [vec![], train_and_eval(&[], &[]).into_iter().collect()] {
            let svg = line_chart_svg("Loss", "step", "loss", &series);
            assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
            assert_balanced(&svg);
            assert!(svg.contains(">no data</text>"));
            assert_eq!(count(&svg, "<polyline"), 0);
            // The 0..1 fallback range still gets ticks and a frame.
            assert!(svg.contains(">0.0</text>") && svg.contains(">1.0</text>"));
            assert!(svg.contains("fill=\"none\" stroke=\"#333\""));
        }
    }

    #[test]
    fn a_single_point_gets_a_marker_in_the_middle_of_a_padded_range() {
        let train = [(1000.0, 5.0)];
        let svg = line_chart_svg("Loss", "step", "loss", &train_and_eval(&train, &[]));
        assert_balanced(&svg);
        assert!(!svg.contains("no data"));
        assert_eq!(count(&svg, "<polyline"), 0);
        // The data marker (the eval legend swatch is the other circle).
        assert_eq!(count(&svg, "<circle"), 2);
        let marker = &svg[svg.find("<circle").unwrap()..];
        let number_after = |key: &str| -> f64 {
            let at = &marker[marker.find(key).unwrap() + key.len()..];
            at[..at.find('"').unwrap()].parse().unwrap()
        };
        let (cx, cy) = (number_after("cx=\""), number_after("cy=\""));
        assert!(cx > 300.0 && cx < 500.0, "cx {cx}");
        assert!(cy > 150.0 && cy < 350.0, "cy {cy}");
        // Ticks around the point: 900..1100 by 50 on x, 4.5..5.5 on y.
        assert!(svg.contains(">1000</text>") && svg.contains(">5.0</text>"));
    }

    #[test]
    fn nice_ticks_use_1_2_5_steps_inside_the_range() {
        assert_eq!(nice_ticks(0.0, 10.3), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(nice_ticks(0.0, 1.0), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(nice_ticks(2.1, 11.4), [4.0, 6.0, 8.0, 10.0]);
        assert_eq!(nice_ticks(-0.4, 0.4), [-0.4, -0.2, 0.0, 0.2, 0.4]);
        assert_eq!(
            nice_ticks(0.0, 100_000.0),
            [0.0, 20_000.0, 40_000.0, 60_000.0, 80_000.0, 100_000.0]
        );
        assert_eq!(nice_ticks(3.0, 3.05), [3.0, 3.01, 3.02, 3.03, 3.04, 3.05]);
        assert!(nice_ticks(1.0, 1.0).is_empty());
        assert!(nice_ticks(0.0, f64::INFINITY).is_empty());
        // 0 from a negative start is +0, so it prints as "0", not "-0".
        assert!(nice_ticks(-0.3, 10.0)[0].is_sign_positive());
    }

    #[test]
    fn tick_labels_share_the_step_precision_and_abbreviate_thousands() {
        let labels = |lo, hi| tick_labels(&nice_ticks(lo, hi), lo, hi);
        assert_eq!(labels(0.0, 10.3), ["0", "2", "4", "6", "8", "10"]);
        assert_eq!(labels(2.0, 4.0), ["2.0", "2.5", "3.0", "3.5", "4.0"]);
        assert_eq!(
            labels(0.0, 5000.0),
            ["0", "1000", "2000", "3000", "4000", "5000"]
        );
        assert_eq!(
            labels(0.0, 100_000.0),
            ["0", "20k", "40k", "60k", "80k", "100k"]
        );
        assert_eq!(labels(10_000.0, 13_000.0)[..3], ["10.0k", "10.5k", "11.0k"]);
        assert_eq!(labels(0.0, 30_000_000.0)[..3], ["0", "5M", "10M"]);
        assert_eq!(labels(0.0, 3_000_000.0)[..3], ["0", "0.5M", "1.0M"]);
        assert_eq!(labels(0.0, 999_000.0)[..3], ["0", "200k", "400k"]);
        assert_eq!(
            labels(-0.3, 0.3),
            ["-0.3", "-0.2", "-0.1", "0.0", "0.1", "0.2", "0.3"]
        );
    }

    #[test]
    fn downsampling_bounds_the_points_and_keeps_the_mean() {
        let mean = |p: &[(f64, f64)]| {
            let n = p.len() as f64;
            (
                p.iter().map(|q| q.0).sum::<f64>() / n,
                p.iter().map(|q| q.1).sum::<f64>() / n,
            )
        };
        // Equal buckets (10 000 = 2000 × 5): the mean is the mean of bucket means.
        let even = loss_curve(9_999, 1, 0.5);
        let down = downsample(&even, MAX_LINE_POINTS);
        assert_eq!(down.len(), MAX_LINE_POINTS);
        let (a, b) = (mean(&even), mean(&down));
        assert!((a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9);
        // Uneven buckets (sizes 5 and 6) shift it only by the size imbalance.
        let uneven = loss_curve(10_700, 1, 0.5);
        let down = downsample(&uneven, MAX_LINE_POINTS);
        assert_eq!(down.len(), MAX_LINE_POINTS);
        let (a, b) = (mean(&uneven), mean(&down));
        assert!((a.1 - b.1).abs() < 0.01 * a.1, "{a:?} vs {b:?}");
        assert!((a.0 - b.0).abs() < 0.01 * a.0, "{a:?} vs {b:?}");
        // Short series pass through untouched.
        let short = loss_curve(100, 1, 0.5);
        assert_eq!(downsample(&short, MAX_LINE_POINTS), short);
    }

    #[test]
    fn long_runs_stay_small_with_abbreviated_step_ticks() {
        let train = loss_curve(200_000, 1, 0.3);
        let eval = loss_curve(200_000, 10_000, 0.0);
        let svg = line_chart_svg("Loss", "step", "loss", &train_and_eval(&train, &eval));
        assert_balanced(&svg);
        assert_eq!(polyline_points(&svg).len(), MAX_LINE_POINTS);
        assert!(svg.len() < 40_000, "{} bytes", svg.len());
        assert!(svg.contains(">50k</text>") && svg.contains(">200k</text>"));
    }

    /// Writes a sample chart to the temp directory for eyeballing (convert with
    /// `rsvg-convert`); ignored because tests should not leave files behind.
    #[test]
    #[ignore]
    fn write_sample_svg() {
        let train = loss_curve(20_000, 1, 0.4);
        let eval = loss_curve(20_000, 1000, 0.0);
        let svg = line_chart_svg(
            "Loss — tiny-gpt <run 3f2a>",
            "step",
            "loss",
            &train_and_eval(&train, &eval),
        );
        let path = std::env::temp_dir().join("loss_curve_sample.svg");
        std::fs::write(&path, svg).unwrap();
        eprintln!("wrote {}", path.display());
    }
}
