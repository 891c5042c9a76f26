//! Turns the JSON lines written by `broker-bench --json FILE` into the
//! tables and charts of `BENCHMARKS.md`.
//!
//! ```text
//! bench-chart --results bench-results/latest.jsonl --out docs/bench --baseline mosquitto
//! ```
//!
//! Writes `throughput.svg` (delivered messages/s per scenario, one bar per
//! broker or backend), `latency.svg` (latency percentiles of the fixed-rate
//! runs) and `tables.md` (every figure, with its ratio to the baseline
//! measured in the same run) into `--out`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use benches::load::report::RunResult;
use clap::Parser;
use plotters::prelude::*;

#[derive(Parser)]
#[command(about = "Draw the charts and tables of BENCHMARKS.md from broker-bench results")]
struct Cli {
    /// JSON lines written by `broker-bench --json`.
    #[arg(long)]
    results: PathBuf,
    /// Directory for throughput.svg, latency.svg and tables.md.
    #[arg(long)]
    out: PathBuf,
    /// The label every other is compared with.
    #[arg(long, default_value = "mosquitto")]
    baseline: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runs = read_results(&cli.results)?;
    if runs.is_empty() {
        bail!("{} holds no results", cli.results.display());
    }
    std::fs::create_dir_all(&cli.out)
        .with_context(|| format!("cannot create {}", cli.out.display()))?;
    let mut labels = labels_in_order(&runs);
    // The baseline first, so that it is the first bar and colour everywhere.
    if let Some(i) = labels.iter().position(|l| *l == cli.baseline) {
        let baseline = labels.remove(i);
        labels.insert(0, baseline);
    }

    let tables = tables(&runs, &labels, &cli.baseline);
    let tables_path = cli.out.join("tables.md");
    std::fs::write(&tables_path, tables)
        .with_context(|| format!("cannot write {}", tables_path.display()))?;

    let capacity: Vec<&RunResult> = runs
        .iter()
        .filter(|r| r.rate == 0 && is_traffic(r))
        .collect();
    throughput_chart(&cli.out.join("throughput.svg"), &capacity, &labels)?;
    let fixed_rate: Vec<&RunResult> = runs.iter().filter(|r| r.rate > 0).collect();
    latency_chart(&cli.out.join("latency.svg"), &fixed_rate, &labels)?;
    println!(
        "wrote {}, throughput.svg and latency.svg in {}",
        tables_path.display(),
        cli.out.display()
    );
    Ok(())
}

fn read_results(path: &Path) -> Result<Vec<RunResult>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not a result", path.display(), n + 1))
        })
        .collect()
}

/// Labels in the order they first appear (the order the script ran them).
fn labels_in_order(runs: &[RunResult]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for r in runs {
        if !labels.contains(&r.label) {
            labels.push(r.label.clone());
        }
    }
    labels
}

/// A publish/subscribe run (not a connection storm or an offline backlog).
fn is_traffic(r: &RunResult) -> bool {
    matches!(r.scenario.as_str(), "fan-in" | "fan-out" | "pairs")
}

/// The row a run belongs to, e.g. `fan-in QoS 1 (4 → 1)`.
fn scenario_name(r: &RunResult) -> String {
    let rate = if r.rate > 0 {
        format!(" at {} msg/s", r.rate)
    } else {
        String::new()
    };
    let over = match r.transport.as_str() {
        "" | "tcp" => String::new(),
        t => format!(" over {t}"),
    };
    format!(
        "{} QoS {} ({} → {}, {} B){rate}{over}",
        r.scenario, r.qos, r.publishers, r.subscribers, r.payload
    )
}

/// A scenario name short enough for an axis label, keeping what tells
/// the rows of one scenario apart: `fan-out QoS 1 (1 → 50, 16384 B)` is
/// `fan-out q1 1→50 16K`.
fn short_name(name: &str) -> String {
    let (head, shape) = name.split_once(" (").unwrap_or((name, ""));
    let head = head.replace(" QoS ", " q");
    let (shape, rest) = shape.split_once(')').unwrap_or((shape, ""));
    let Some((flow, payload)) = shape.split_once(", ") else {
        return head;
    };
    let payload = match payload.trim_end_matches(" B").parse::<u64>() {
        Ok(b) if b >= 1024 && b % 1024 == 0 => format!("{}K", b / 1024),
        Ok(b) => format!("{b}B"),
        Err(_) => payload.to_owned(),
    };
    format!("{head} {} {payload}{rest}", flow.replace(" → ", "→"))
}

/// How a persistent run spreads its messages: every message to every
/// subscriber, or one topic (one session) per message.
fn persistent_pattern(r: &RunResult) -> String {
    let per_message = r.expected as f64 / r.acked.max(1) as f64;
    let shape = if r.subscribers > 1 && per_message < 1.5 {
        format!("{} sessions, a topic each", r.subscribers)
    } else {
        format!("fan-out to {} sessions", r.subscribers)
    };
    format!(
        "QoS {}, {} publishers, {} messages, {shape}",
        r.qos, r.publishers, r.acked
    )
}

/// `value / base` as `1.23x`, or `-` without a baseline.
fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}x", value / b),
        _ => "-".to_owned(),
    }
}

/// The last run of each (scenario, label): a re-run replaces an earlier one.
fn by_scenario<'a>(
    runs: impl Iterator<Item = &'a RunResult>,
) -> BTreeMap<String, BTreeMap<String, &'a RunResult>> {
    let mut map: BTreeMap<String, BTreeMap<String, &RunResult>> = BTreeMap::new();
    for r in runs {
        map.entry(scenario_name(r))
            .or_default()
            .insert(r.label.clone(), r);
    }
    map
}

fn tables(runs: &[RunResult], labels: &[String], baseline: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Ratios compare with `{baseline}` in the same run (higher is better for \
         throughput, lower for latency and memory).\n"
    );

    let _ = writeln!(out, "### Capacity (flat out)\n");
    let _ = writeln!(
        out,
        "| scenario | target | delivered msg/s | vs {baseline} | p50 ms | p99 ms | losses | order violations |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|");
    for (name, row) in by_scenario(runs.iter().filter(|r| r.rate == 0 && is_traffic(r))) {
        let base = row.get(baseline).map(|r| r.delivered_per_s);
        for label in labels {
            if let Some(r) = row.get(label) {
                let _ = writeln!(
                    out,
                    "| {name} | {label} | {:.0} | {} | {:.2} | {:.2} | {} | {} |",
                    r.delivered_per_s,
                    ratio(r.delivered_per_s, base),
                    r.latency_ms.p50,
                    r.latency_ms.p99,
                    r.losses,
                    r.order_violations
                );
            }
        }
    }

    if runs.iter().any(|r| r.rate > 0) {
        let _ = writeln!(out, "\n### Latency at a fixed rate\n");
        let _ = writeln!(
            out,
            "| scenario | target | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | p99 vs {baseline} | losses |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for (name, row) in by_scenario(runs.iter().filter(|r| r.rate > 0)) {
            let base = row.get(baseline).map(|r| r.latency_ms.p99);
            for label in labels {
                if let Some(r) = row.get(label) {
                    let l = &r.latency_ms;
                    let _ = writeln!(
                        out,
                        "| {name} | {label} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |",
                        l.p50,
                        l.p90,
                        l.p99,
                        l.p999,
                        l.max,
                        ratio(l.p99, base),
                        r.losses
                    );
                }
            }
        }
    }

    let persistent: Vec<&RunResult> = runs.iter().filter(|r| r.scenario == "persistent").collect();
    if !persistent.is_empty() {
        let _ = writeln!(
            out,
            "\n### Persistent sessions: backlog for offline subscribers\n"
        );
        let _ = writeln!(
            out,
            "| pattern | target | acked publishes/s | vs {baseline} | queued deliveries/s | drain deliveries/s | vs {baseline} | losses | duplicates | order violations |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut patterns: BTreeMap<String, BTreeMap<String, &RunResult>> = BTreeMap::new();
        for r in &persistent {
            patterns
                .entry(persistent_pattern(r))
                .or_default()
                .insert(r.label.clone(), r);
        }
        for (pattern, row) in &patterns {
            let base = row.get(baseline);
            for label in labels {
                let Some(r) = row.get(label) else { continue };
                let fan_out = r.expected as f64 / r.acked.max(1) as f64;
                let drain = r.drain_per_s.unwrap_or(0.0);
                let _ = writeln!(
                    out,
                    "| {pattern} | {label} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
                    r.publish_per_s,
                    ratio(r.publish_per_s, base.map(|b| b.publish_per_s)),
                    r.publish_per_s * fan_out,
                    drain,
                    ratio(drain, base.and_then(|b| b.drain_per_s)),
                    r.losses,
                    r.duplicates,
                    r.order_violations
                );
            }
        }
    }

    let conns: Vec<&RunResult> = runs.iter().filter(|r| r.scenario == "conn").collect();
    if !conns.is_empty() {
        let _ = writeln!(out, "\n### Idle connections\n");
        let _ = writeln!(
            out,
            "| target | transport | connections | held | connects/s | vs {baseline} | broker memory per connection |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
        let transport = |r: &RunResult| match r.transport.as_str() {
            "" => "tcp".to_owned(),
            t => t.to_owned(),
        };
        let mut transports: Vec<String> = conns.iter().map(|r| transport(r)).collect();
        transports.sort();
        transports.dedup();
        for t in &transports {
            let of = |label: &str| {
                conns
                    .iter()
                    .rev()
                    .find(|r| r.label == label && &transport(r) == t)
            };
            let base = of(baseline);
            for label in labels {
                if let Some(r) = of(label) {
                    let per_conn = r
                        .bytes_per_connection
                        .map(|b| format!("{:.1} KB", b / 1024.0))
                        .unwrap_or_else(|| "-".to_owned());
                    let _ = writeln!(
                        out,
                        "| {label} | {t} | {} | {} | {:.0} | {} | {per_conn} |",
                        r.connections.unwrap_or(0),
                        r.held.unwrap_or(0),
                        r.connects_per_s.unwrap_or(0.0),
                        ratio(
                            r.connects_per_s.unwrap_or(0.0),
                            base.and_then(|b| b.connects_per_s)
                        ),
                    );
                }
            }
        }
    }
    out
}

/// A colour per label, stable across both charts.
fn colour(index: usize) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(120, 120, 120),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    PALETTE[index % PALETTE.len()]
}

/// Grouped bars: one group per scenario, one bar per label.
fn throughput_chart(path: &Path, runs: &[&RunResult], labels: &[String]) -> Result<()> {
    let rows = by_scenario(runs.iter().copied());
    let names: Vec<&String> = rows.keys().collect();
    let top = runs.iter().map(|r| r.delivered_per_s).fold(1.0, f64::max) * 1.15;
    // At least 130 px per group, so that the axis labels do not overlap.
    let width = 1100.max(130 * names.len() as u32 + 100);
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = names.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Delivered messages/s, flat out (higher is better)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..groups, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Ticks every half group; only the group centres get a name.
        .x_labels(names.len() * 2 + 1)
        .x_label_formatter(&|x: &f64| {
            if (x.fract() - 0.5).abs() > 0.01 {
                return String::new();
            }
            names
                .get(x.floor() as usize)
                .map(|n| short_name(n))
                .unwrap_or_default()
        })
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()?;
    let width = 0.8 / labels.len().max(1) as f64;
    for (li, label) in labels.iter().enumerate() {
        let style = colour(li).filled();
        let bars: Vec<Rectangle<(f64, f64)>> = names
            .iter()
            .enumerate()
            .filter_map(|(gi, name)| {
                let r = rows.get(*name)?.get(label)?;
                let x0 = gi as f64 + 0.1 + li as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, r.delivered_per_s)],
                    style,
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// One line per label over the percentiles p50, p90, p99, p99.9 (log scale).
fn latency_chart(path: &Path, runs: &[&RunResult], labels: &[String]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = runs
        .first()
        .map(|r| {
            format!(
                "Latency at a fixed rate: {} (lower is better)",
                scenario_name(r)
            )
        })
        .unwrap_or_else(|| "Latency at a fixed rate".to_owned());
    let points = |r: &RunResult| {
        let l = &r.latency_ms;
        vec![
            (0.0, l.p50.max(0.001)),
            (1.0, l.p90.max(0.001)),
            (2.0, l.p99.max(0.001)),
            (3.0, l.p999.max(0.001)),
        ]
    };
    let top = runs
        .iter()
        .flat_map(|r| points(r))
        .map(|(_, y)| y)
        .fold(1.0, f64::max)
        * 2.0;
    let bottom = runs
        .iter()
        .flat_map(|r| points(r))
        .map(|(_, y)| y)
        .fold(top, f64::min)
        / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2..3.2, (bottom..top).log_scale())?;
    const NAMES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];
    chart
        .configure_mesh()
        .x_labels(4)
        .x_label_formatter(&|x: &f64| {
            let i = x.round();
            if (x - i).abs() < 0.05 && (0.0..4.0).contains(&i) {
                NAMES[i as usize].to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("ms")
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    for (li, label) in labels.iter().enumerate() {
        let Some(r) = runs.iter().rev().find(|r| &r.label == label) else {
            continue;
        };
        let style = colour(li).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points(r), style))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
        chart.draw_series(
            points(r)
                .into_iter()
                .map(|p| Circle::new(p, 3, colour(li).filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::short_name;

    #[test]
    fn axis_labels_keep_what_tells_rows_apart() {
        assert_eq!(
            short_name("fan-out QoS 1 (1 → 50, 16384 B)"),
            "fan-out q1 1→50 16K"
        );
        assert_eq!(
            short_name("fan-in QoS 0 (4 → 1, 64 B)"),
            "fan-in q0 4→1 64B"
        );
        assert_eq!(
            short_name("pairs QoS 1 (1 → 1, 64 B) at 2000 msg/s"),
            "pairs q1 1→1 64B at 2000 msg/s"
        );
        assert_eq!(short_name("conn"), "conn");
    }
}
