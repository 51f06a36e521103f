//! The picture: plotters' SVG backend, two charts on one page.
//!
//! Top, the whole migration: each pass as a bar from its start to its
//! end, as high as its rate (blue while the guest ran, red for the last
//! pass with the guest stopped), labelled with its bytes and rate; the
//! guest's dirty rate during each pass (orange); the auto-converge
//! throttle (green, right axis); the stop marked. Bottom, the switchover
//! zoomed: the window the guest was stopped, the destination's resume,
//! and every announce event on a row of its identity.

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::{AnnounceFrame, Timeline};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 800;
const TOP: u32 = 440;
/// Identities drawn as rows of the switchover chart; more are counted.
const MAX_ROWS: usize = 16;
/// The switchover chart's axis starts here (ms after the stop): events
/// at or before the stop are drawn at its left edge.
const MIN_AFTER: f64 = 0.05;

#[derive(Debug, PartialEq, Eq)]
pub struct DrawError(pub String);

impl std::fmt::Display for DrawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "drawing the timeline: {}", self.0)
    }
}

impl std::error::Error for DrawError {}

fn err<E: std::fmt::Debug>(e: E) -> DrawError {
    DrawError(format!("{e:?}"))
}

/// The timeline as an SVG document.
pub fn svg(t: &Timeline) -> Result<String, DrawError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(TOP);
        whole(&top, t)?;
        switchover(&bottom, t)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn whole<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    t: &Timeline,
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let end = t
        .passes
        .iter()
        .map(|p| p.end_ms)
        .chain(t.resume_ms)
        .chain(t.total_ms)
        .fold(1.0f64, f64::max);
    let top_rate = t
        .passes
        .iter()
        .flat_map(|p| [p.mbytes_per_sec, p.dirty_mbytes_per_sec])
        .fold(1.0f64, f64::max)
        * 1.45;
    let sent: u64 = t.passes.iter().map(|p| p.bytes).sum();
    let caption = format!(
        "migration to {} — {} passes, {:.0} MB in {:.0} ms{}, guest stopped {}",
        t.uri,
        t.passes.len(),
        mb(sent),
        t.total_ms.unwrap_or(end),
        match t.channels {
            0 => String::new(),
            n => format!(" over {n} multifd channels"),
        },
        t.downtime_ms
            .map_or_else(|| "—".into(), |d| format!("{d:.1} ms")),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(60)
        .right_y_label_area_size(50)
        .build_cartesian_2d(0f64..end * 1.02, 0f64..top_rate)
        .map_err(err)?
        .set_secondary_coord(0f64..end * 1.02, 0f64..100f64);
    chart
        .configure_mesh()
        .x_desc("ms since the migration started")
        .y_desc("MB/s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("throttle %")
        .draw()
        .map_err(err)?;

    let blue = RGBColor(54, 110, 200);
    let red = RGBColor(210, 50, 50);
    chart
        .draw_series(t.passes.iter().map(|p| {
            let color = if p.live { blue } else { red };
            // A pass too short to see still gets a sliver.
            let right = p.end_ms.max(p.start_ms + end / 600.0);
            Rectangle::new(
                [(p.start_ms, 0.0), (right, p.mbytes_per_sec)],
                color.mix(0.55).filled(),
            )
        }))
        .map_err(err)?
        .label("pass: its rate (MB/s) from start to end")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], blue.filled()));
    // Labels inside passes wide enough for them; the others are listed
    // in the headroom above the bars (the JSON has them all).
    let mut unlabelled = Vec::new();
    for p in &t.passes {
        let text = format!(
            "pass {}: {:.1} MB, {} data + {} zero pages, {:.0} MB/s",
            p.pass,
            mb(p.bytes),
            p.data_pages,
            p.zero_pages,
            p.mbytes_per_sec
        );
        if p.end_ms - p.start_ms > end * 0.3 {
            chart
                .draw_series(std::iter::once(Text::new(
                    text,
                    (p.start_ms + end * 0.01, p.mbytes_per_sec * 0.5),
                    ("sans-serif", 12),
                )))
                .map_err(err)?;
        } else {
            unlabelled.push(text);
        }
    }
    const LISTED: usize = 5;
    let mut lines: Vec<String> = unlabelled.iter().take(LISTED).cloned().collect();
    if unlabelled.len() > LISTED {
        lines.push(format!("… and {} more passes", unlabelled.len() - LISTED));
    }
    for (i, text) in lines.into_iter().enumerate() {
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (end * 0.01, top_rate * (0.97 - 0.045 * i as f64)),
                ("sans-serif", 11),
            )))
            .map_err(err)?;
    }
    let orange = RGBColor(240, 140, 20);
    let dirty: Vec<(f64, f64)> = t
        .passes
        .iter()
        .filter(|p| p.live)
        .flat_map(|p| {
            [
                (p.start_ms, p.dirty_mbytes_per_sec),
                (p.end_ms, p.dirty_mbytes_per_sec),
            ]
        })
        .collect();
    chart
        .draw_series(LineSeries::new(dirty, orange.stroke_width(2)))
        .map_err(err)?
        .label("guest dirty rate (MB/s)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], orange.stroke_width(2)));
    let green = RGBColor(40, 160, 70);
    let mut steps: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    for s in &t.throttle {
        let last = steps.last().map_or(0.0, |p| p.1);
        steps.push((s.at_ms, last));
        steps.push((s.at_ms, s.percent as f64));
    }
    let last = steps.last().map_or(0.0, |p| p.1);
    steps.push((t.stop_ms.unwrap_or(end), last));
    chart
        .draw_secondary_series(LineSeries::new(steps, green.stroke_width(2)))
        .map_err(err)?
        .label("auto-converge throttle (%)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], green.stroke_width(2)));
    if let Some(stop) = t.stop_ms {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(stop, 0.0), (stop, top_rate)],
                red.stroke_width(1),
            )))
            .map_err(err)?
            .label("guest stopped (zoomed below)")
            .legend(move |(x, y)| PathElement::new(vec![(x + 6, y - 6), (x + 6, y + 6)], red));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The identities of the announce, in order of first appearance.
fn identities(frames: &[AnnounceFrame]) -> Vec<(String, Option<u16>)> {
    let mut ids: Vec<(String, Option<u16>)> = Vec::new();
    for f in frames.iter().filter(|f| !f.mac.is_empty()) {
        let id = (f.mac.clone(), f.vlan);
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

fn id_label(id: &(String, Option<u16>)) -> String {
    match id.1 {
        Some(v) => format!("{} VLAN {v}", id.0),
        None => id.0.clone(),
    }
}

fn switchover<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    t: &Timeline,
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let dest = t.destination.clone().unwrap_or_default();
    let ids = identities(&dest.announce);
    let shown = ids.len().min(MAX_ROWS);
    // Rows, top to bottom: stopped, resumed, the guest's driver, the
    // forwarded frames (when there were any), then one per identity.
    let fwd = usize::from(!t.forward.is_empty());
    let first_id = 3 + fwd;
    let rows = first_id + shown;
    let mut names = vec![
        "guest stopped".to_string(),
        "destination runs".to_string(),
        "guest driver".to_string(),
    ];
    if fwd > 0 {
        names.push("frames forwarded".to_string());
    }
    names.extend(ids.iter().take(MAX_ROWS).map(id_label));
    let row_y = |row: usize| (rows - 1 - row) as f64;

    // ms after the stop, on a log axis: the stop's milliseconds and the
    // announce's hundreds of milliseconds on one picture.
    let stop = t.stop_ms.unwrap_or(0.0);
    let after = |at: f64| (at - stop).max(MIN_AFTER);
    let last = dest
        .announce
        .iter()
        .map(|f| f.at_ms)
        .chain(dest.resumed_ms)
        .chain(t.resume_ms)
        .chain(t.forward.iter().map(|f| f.end_ms))
        .fold(stop + 1.0, f64::max);
    let to = after(last) * 1.5;
    let title = format!(
        "switchover: guest stopped {}{}, {} announce events for {} identities{}",
        t.downtime_ms
            .map_or_else(|| "—".into(), |d| format!("{d:.1} ms")),
        match (dest.resumed_ms, t.resume_ms) {
            (Some(r), _) => format!(
                ", running on the destination {:.1} ms after the stop",
                r - stop
            ),
            (None, Some(_)) if t.destination.is_none() => String::new(),
            _ => ", not running on the destination yet".into(),
        },
        dest.announce.len(),
        ids.len(),
        if ids.len() > shown || dest.announce_left_out > 0 {
            format!(
                " ({} identities and {} events not drawn)",
                ids.len() - shown,
                dest.announce_left_out
            )
        } else {
            String::new()
        }
    );
    let names_for_axis = names.clone();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(210)
        .build_cartesian_2d((MIN_AFTER..to).log_scale(), -0.6f64..(rows as f64 - 0.4))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("ms after the guest stopped (log scale)")
        .x_label_formatter(&|x| {
            if *x >= 1.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.2}")
            }
        })
        .y_labels(rows)
        .y_label_formatter(&move |y| {
            let i = rows as f64 - 1.0 - y.round();
            names_for_axis.get(i as usize).cloned().unwrap_or_default()
        })
        .disable_y_mesh()
        .draw()
        .map_err(err)?;
    let red = RGBColor(210, 50, 50);
    if let (Some(s), Some(r)) = (t.stop_ms, t.resume_ms) {
        let y = row_y(0);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(after(s), y - 0.3), (after(r), y + 0.3)],
                red.mix(0.6).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("guest stopped {:.1} ms, until the ACK", r - s),
                (after(r), y + 0.3),
                ("sans-serif", 12),
            )))
            .map_err(err)?;
    }
    let dark = RGBColor(30, 30, 30);
    if let Some(r) = dest.resumed_ms {
        let y = row_y(1);
        chart
            .draw_series(std::iter::once(Circle::new(
                (after(r), y),
                5,
                dark.filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("resumed +{:.1} ms", r - stop),
                (after(r), y + 0.3),
                ("sans-serif", 12),
            )))
            .map_err(err)?;
    }
    if fwd > 0 {
        forwarded(&mut chart, t, &dest, row_y(3), &after)?;
    }
    let blue = RGBColor(54, 110, 200);
    let green = RGBColor(40, 160, 70);
    for f in &dest.announce {
        let row = if f.mac.is_empty() {
            Some(2)
        } else {
            ids.iter()
                .take(MAX_ROWS)
                .position(|id| id.0 == f.mac && id.1 == f.vlan)
                .map(|i| first_id + i)
        };
        let Some(row) = row else { continue };
        let at = (after(f.at_ms), row_y(row));
        match f.kind.as_str() {
            "rarp" => chart
                .draw_series(std::iter::once(Circle::new(at, 4, blue.filled())))
                .map(|_| ()),
            "guest" => chart
                .draw_series(std::iter::once(TriangleMarker::new(at, 6, green.filled())))
                .map(|_| ()),
            _ => chart
                .draw_series(std::iter::once(Cross::new(at, 5, dark.stroke_width(2))))
                .map(|_| ()),
        }
        .map_err(err)?;
    }
    // The key, in words: the shapes are few.
    chart
        .draw_series(std::iter::once(Text::new(
            "● RARP from Ferry   ▲ the guest's own frame   × driver asked / acknowledged",
            (MIN_AFTER * 1.1, -0.5),
            ("sans-serif", 11),
        )))
        .map_err(err)?;
    Ok(())
}

/// The forwarded frames' row: from the stop (the capture begins) to the
/// end record, a tick per batch sent, and the counts of both ends.
fn forwarded<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<LogCoord<f64>, RangedCoordf64>>,
    t: &Timeline,
    dest: &crate::Destination,
    y: f64,
    after: &dyn Fn(f64) -> f64,
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let orange = RGBColor(230, 140, 30);
    let from = t.stop_ms.unwrap_or(0.0);
    let to = t.forward.iter().map(|f| f.end_ms).fold(from, f64::max);
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(after(from), y - 0.15), (after(to), y + 0.15)],
            orange.mix(0.35).filled(),
        )))
        .map_err(err)?;
    chart
        .draw_series(t.forward_batches.iter().map(|b| {
            Rectangle::new(
                [(after(b.at_ms), y - 0.3), (after(b.at_ms) * 1.01, y + 0.3)],
                orange.filled(),
            )
        }))
        .map_err(err)?;
    let sum = |f: fn(&crate::Forward) -> u64| t.forward.iter().map(f).sum::<u64>();
    let delivered: u64 = dest.forwarded.iter().map(|d| d.delivered).sum();
    let ended: Vec<&str> = t.forward.iter().map(|f| f.ended_by.as_str()).collect();
    chart
        .draw_series(std::iter::once(Text::new(
            format!(
                "{} captured, {} forwarded, {} dropped, {} delivered there (ended: {})",
                sum(|f| f.captured),
                sum(|f| f.forwarded),
                sum(|f| f.dropped),
                delivered,
                ended.join(", ")
            ),
            (after(from), y + 0.3),
            ("sans-serif", 12),
        )))
        .map_err(err)?;
    Ok(())
}
