//! Progress of `broker migrate` on stderr: bars on a terminal, plain
//! lines in a log, one summary line per phase either way.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Without bars, a line at each tenth of a phase, but not more often than
/// this: a short phase prints its summary alone.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

/// Where progress goes: bars on a terminal, plain lines otherwise (a log,
/// a pipe), and nothing at all for [`Progress::quiet`].
pub struct Progress {
    bars: bool,
    lines: bool,
}

impl Progress {
    /// To stderr: bars drawn when it is a terminal, hidden otherwise; the
    /// summary line of each phase always, and without bars a plain line at
    /// every tenth of a phase (at most one a second) for logs.
    pub fn stderr() -> Progress {
        Progress {
            bars: std::io::stderr().is_terminal(),
            lines: true,
        }
    }

    /// Nothing printed (tests, embedding).
    pub fn quiet() -> Progress {
        Progress {
            bars: false,
            lines: false,
        }
    }

    pub(super) fn line(&self, text: &str) {
        if self.lines {
            eprintln!("{text}");
        }
    }

    pub(super) fn phase(&self, name: &'static str, len: u64, unit: &'static str) -> Phase<'_> {
        let target = if self.bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        let template = format!(
            "{{prefix:>15}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ({{elapsed}}, ETA {{eta}})"
        );
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(name);
        Phase {
            progress: self,
            name,
            unit,
            bar,
            started: Instant::now(),
            last_line: Instant::now(),
            len,
            tenths: 0,
        }
    }
}

/// One phase's bar (or lines).
pub(super) struct Phase<'p> {
    progress: &'p Progress,
    name: &'static str,
    unit: &'static str,
    pub(super) bar: ProgressBar,
    pub(super) started: Instant,
    /// When the last plain line was printed (or the phase started).
    last_line: Instant,
    len: u64,
    tenths: u64,
}

impl Phase<'_> {
    pub(super) fn advance(&mut self, by: u64, detail: impl FnOnce() -> String) {
        let detail = detail();
        if !detail.is_empty() {
            self.bar.set_message(detail.clone());
        }
        self.bar.inc(by);
        if self.progress.bars || !self.progress.lines || self.len == 0 {
            return;
        }
        let pos = self.bar.position();
        let tenths = pos * 10 / self.len;
        if tenths > self.tenths && pos < self.len && self.last_line.elapsed() >= PLAIN_EVERY {
            self.tenths = tenths;
            self.last_line = Instant::now();
            let sep = if detail.is_empty() { "" } else { ", " };
            eprintln!(
                "{}: {pos}/{} {}{sep}{detail}",
                self.name, self.len, self.unit
            );
        }
    }

    pub(super) fn finish(self, summary: &str) {
        self.bar.finish_and_clear();
        self.progress.line(&format!(
            "{}: {summary} in {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        ));
    }
}
