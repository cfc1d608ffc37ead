//! Tables that fit the terminal: the columns a tester scans for, long values (hosts, reasons)
//! cut with an ellipsis so every row stays one line, and `--columns` / `--wide` to choose.
//! Full values are always in `--json`.

use std::time::{Duration, SystemTime};

use anyhow::bail;
use clap::Args;

/// How a table is drawn.
#[derive(Debug, Clone, Args)]
pub struct TableArgs {
    /// Never cut long values to fit the terminal.
    #[arg(long)]
    pub wide: bool,
    /// Comma-separated columns to show, in order (`--help` lists them).
    #[arg(long, value_name = "COLUMNS")]
    pub columns: Option<String>,
    /// Times in the local time zone (default UTC).
    #[arg(long)]
    pub local_time: bool,
}

/// How cells render values that depend on the reader: local or UTC times, and "now" for the
/// duration of what is still open.
#[derive(Clone)]
pub struct View {
    /// Times in the local time zone instead of UTC.
    pub local_time: bool,
    /// The moment the table is drawn.
    pub now: SystemTime,
}

impl View {
    /// A view drawn now.
    pub fn new(local_time: bool) -> Self {
        Self {
            local_time,
            now: SystemTime::now(),
        }
    }

    /// A timestamp to the second, UTC (`Z`) or local (with its offset).
    pub fn time(&self, t: SystemTime) -> String {
        self.format(t, "%Y-%m-%d %H:%M:%S")
    }

    /// A timestamp to the microsecond (packets), UTC or local.
    pub fn time_us(&self, t: SystemTime) -> String {
        self.format(t, "%Y-%m-%d %H:%M:%S%.6f")
    }

    fn format(&self, t: SystemTime, fmt: &str) -> String {
        let t: chrono::DateTime<chrono::Utc> = t.into();
        if self.local_time {
            let t = t.with_timezone(&chrono::Local);
            format!("{}{}", t.format(fmt), t.format("%:z"))
        } else {
            format!("{}Z", t.format(fmt))
        }
    }
}

/// One column: its `--columns` key, header, and how a row's cell reads.
pub struct Column<T> {
    /// The name `--columns` takes.
    pub key: &'static str,
    /// The header line.
    pub header: &'static str,
    /// The cell of one row.
    pub cell: fn(&T, &View) -> String,
    /// Long values are cut to make the table fit (host names, reasons); other columns keep
    /// their full width.
    pub shrinks: bool,
    /// Right-aligned (numbers).
    pub right: bool,
    /// Shown when `--columns` is not given.
    pub default: bool,
    /// When the terminal is too narrow for every column even with long values cut, the
    /// columns with the lowest rank are left out first.
    pub rank: u8,
    /// A cut value keeps its `:port` end (targets): the port matters more than the host's
    /// tail.
    pub keeps_port: bool,
    /// The key of a column left out together with this one (C2S with S2C: one direction's
    /// bytes alone mislead).
    pub pair: Option<&'static str>,
}

impl<T> Column<T> {
    /// A shown-by-default, left-aligned column of `rank` kept at full width; the methods
    /// below change that.
    pub const fn new(
        key: &'static str,
        header: &'static str,
        rank: u8,
        cell: fn(&T, &View) -> String,
    ) -> Self {
        Self {
            key,
            header,
            cell,
            shrinks: false,
            right: false,
            default: true,
            rank,
            keeps_port: false,
            pair: None,
        }
    }

    /// The same column, right-aligned (numbers, sizes, times).
    pub const fn right_aligned(mut self) -> Self {
        self.right = true;
        self
    }

    /// The same column, its long values cut to fit (host names, reasons).
    pub const fn cut_to_fit(mut self) -> Self {
        self.shrinks = true;
        self
    }

    /// The same column, shown only when `--columns` names it.
    pub const fn on_request(mut self) -> Self {
        self.default = false;
        self
    }

    /// The same column, keeping its `:port` end when cut.
    pub const fn keeps_port(mut self) -> Self {
        self.keeps_port = true;
        self
    }

    /// The same column, left out together with column `key`.
    pub const fn paired_with(mut self, key: &'static str) -> Self {
        self.pair = Some(key);
        self
    }
}

/// The narrowest a shrinking column is cut to before whole columns are left out.
const MIN_SHRUNK: usize = 12;

/// The columns named in `chosen` (comma-separated keys, in that order), or the default ones.
pub fn select<'a, T>(
    all: &'a [Column<T>],
    chosen: Option<&str>,
) -> anyhow::Result<Vec<&'a Column<T>>> {
    let Some(chosen) = chosen else {
        return Ok(all.iter().filter(|c| c.default).collect());
    };
    let mut out = Vec::new();
    for key in chosen.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        match all.iter().find(|c| c.key == key) {
            Some(c) => out.push(c),
            None => {
                let keys: Vec<&str> = all.iter().map(|c| c.key).collect();
                bail!("unknown column {key:?}: choose from {}", keys.join(","));
            }
        }
    }
    if out.is_empty() {
        bail!("--columns names no column");
    }
    Ok(out)
}

/// The width to fit: none with `--wide`, else `COLUMNS` when set, else the terminal's width
/// when stdout is one (piped output is not cut).
pub fn target_width(wide: bool) -> Option<u16> {
    if wide {
        return None;
    }
    if let Some(cols) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(cols);
    }
    comfy_table::Table::new().width()
}

/// The table of `rows` as text lines (header first), each at most `width` columns wide: long
/// values are cut first, then the lowest-ranked columns left out.
pub fn render<T>(columns: &[&Column<T>], rows: &[T], view: &View, width: Option<u16>) -> String {
    let mut pager = Pager::new(columns.to_vec(), view.clone(), width);
    pager.page(rows).join("\n")
}

/// `value` cut with an ellipsis to `width` characters; a `host:port` keeps its port.
pub fn cut_keeping_port(value: &str, width: usize) -> String {
    if value.chars().count() <= width {
        return value.to_string();
    }
    if let Some((host, port)) = value.rsplit_once(':')
        && !port.is_empty()
        && port.chars().all(|c| c.is_ascii_digit())
        && port.len() + 2 < width
    {
        let keep = width - port.len() - 2;
        let host: String = host.chars().take(keep).collect();
        return format!("{host}…:{port}");
    }
    cut(value, width)
}

/// `value` cut with an ellipsis to `width` characters.
fn cut(value: &str, width: usize) -> String {
    if value.chars().count() <= width {
        return value.to_string();
    }
    let mut v: String = value.chars().take(width.saturating_sub(1)).collect();
    v.push('…');
    v
}

/// The columns (indexes) that fit in `width` with long values cut to [`MIN_SHRUNK`]: the
/// lowest-ranked ones are left out first.
fn fit<T>(columns: &[&Column<T>], cells: &[Vec<String>], width: usize) -> Vec<usize> {
    let mut shown: Vec<usize> = (0..columns.len()).collect();
    // The width each column needs: its widest value, or for a shrinking column at most
    // MIN_SHRUNK; one space between columns.
    let need: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let widest = widest(c, cells.iter().map(|r| r[i].as_str()));
            if c.shrinks {
                widest.min(MIN_SHRUNK)
            } else {
                widest
            }
        })
        .collect();
    while shown.len() > 1 && shown.iter().map(|&i| need[i] + 1).sum::<usize>() > width {
        let Some(pos) = (0..shown.len()).min_by_key(|&p| (columns[shown[p]].rank, usize::MAX - p))
        else {
            break;
        };
        let gone = columns[shown[pos]];
        shown.retain(|&i| {
            let c = columns[i];
            !std::ptr::eq(c, gone) && gone.pair != Some(c.key) && c.pair != Some(gone.key)
        });
    }
    shown
}

/// The widest of a column's header and `values`, in characters.
fn widest<'v, T>(c: &Column<T>, values: impl Iterator<Item = &'v str>) -> usize {
    values
        .map(|v| v.chars().count())
        .chain([c.header.len()])
        .max()
        .unwrap_or(0)
}

/// A table printed page by page as its rows arrive (`history` streams pages of packets, too
/// many to hold for one [`render`]). The first page decides which columns fit; a column's
/// width is the widest value seen so far, so later pages line up unless a value grows, and
/// the shrinking columns share what is left of the terminal (cut with an ellipsis).
pub struct Pager<'c, T> {
    columns: Vec<&'c Column<T>>,
    view: View,
    width: Option<usize>,
    /// Chosen with the first page.
    shown: Option<Vec<usize>>,
    widths: Vec<usize>,
}

impl<'c, T> Pager<'c, T> {
    /// A pager for `columns`, fitting `width` (none: never cut).
    pub fn new(columns: Vec<&'c Column<T>>, view: View, width: Option<u16>) -> Self {
        let widths = columns.iter().map(|c| c.header.len()).collect();
        Self {
            columns,
            view,
            width: width.map(usize::from),
            shown: None,
            widths,
        }
    }

    /// The lines of one page of rows, the header line first on the first page.
    pub fn page(&mut self, rows: &[T]) -> Vec<String> {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                self.columns
                    .iter()
                    .map(|c| (c.cell)(r, &self.view))
                    .collect()
            })
            .collect();
        let mut lines = Vec::new();
        let shown = match &self.shown {
            Some(s) => s.clone(),
            None => {
                let s = match self.width {
                    Some(w) => fit(&self.columns, &cells, w),
                    None => (0..self.columns.len()).collect(),
                };
                self.shown = Some(s.clone());
                let header: Vec<String> = self.columns.iter().map(|c| c.header.into()).collect();
                lines.push(header);
                s
            }
        };
        for (i, c) in self.columns.iter().enumerate() {
            self.widths[i] = self.widths[i].max(widest(c, cells.iter().map(|r| r[i].as_str())));
        }
        // What the shrinking columns may take: the rest of the line, shared equally, except
        // that a column narrower than its share keeps its width and leaves the rest to others.
        let fixed: usize = shown
            .iter()
            .filter(|&&i| !self.columns[i].shrinks)
            .map(|&i| self.widths[i] + 1)
            .sum();
        let mut allowed: Vec<Option<usize>> = vec![None; self.columns.len()];
        if let Some(w) = self.width {
            let mut budget = w.saturating_sub(fixed);
            let mut open: Vec<usize> = shown
                .iter()
                .copied()
                .filter(|&i| self.columns[i].shrinks)
                .collect();
            while !open.is_empty() {
                let share = budget / open.len();
                let (small, big): (Vec<usize>, Vec<usize>) =
                    open.iter().copied().partition(|&i| self.widths[i] < share);
                if small.is_empty() {
                    for i in big {
                        allowed[i] = Some(share.saturating_sub(1).max(1));
                    }
                    break;
                }
                for i in small {
                    budget -= self.widths[i] + 1;
                }
                open = big;
            }
        }
        lines.extend(cells);
        lines
            .iter()
            .map(|row| {
                let mut line = String::new();
                for (pos, &i) in shown.iter().enumerate() {
                    let c = self.columns[i];
                    let mut w = self.widths[i];
                    let mut v = row[i].clone();
                    if let Some(share) = allowed[i] {
                        w = w.min(share);
                        v = if c.keeps_port {
                            cut_keeping_port(&v, w)
                        } else {
                            cut(&v, w)
                        };
                    }
                    if pos > 0 {
                        line.push(' ');
                    }
                    if c.right {
                        line.push_str(&format!("{v:>w$}"));
                    } else {
                        line.push_str(&format!("{v:<w$}"));
                    }
                }
                line.trim_end().to_string()
            })
            .collect()
    }
}

/// A byte count for a table: exact below 10 KiB, then KiB, MiB, GiB with one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if n < 10 * 1024 {
        return n.to_string();
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// A byte count in words: `512 bytes`, `1 byte`, and from 10 KiB on with its size in units,
/// `10737418240 bytes (10.0 GiB)` (the exact count stays, for comparing with `--json`).
pub fn size(n: u64) -> String {
    match n {
        1 => "1 byte".into(),
        n if n < 10 * 1024 => format!("{n} bytes"),
        n => format!("{n} bytes ({})", bytes(n)),
    }
}

/// A duration for a table: `850ms`, `12.3s`, `4m05s`, `2h03m`, `3d04h`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct R(&'static str, u64);

    const COLS: [Column<R>; 2] = [
        Column {
            key: "name",
            header: "NAME",
            cell: |r, _| r.0.to_string(),
            shrinks: true,
            right: false,
            default: true,
            rank: 9,
            keeps_port: false,
            pair: None,
        },
        Column {
            key: "n",
            header: "N",
            cell: |r, _| r.1.to_string(),
            shrinks: false,
            right: true,
            default: true,
            rank: 8,
            keeps_port: false,
            pair: None,
        },
    ];

    #[test]
    fn long_values_are_cut_to_fit_and_numbers_kept_whole() {
        let rows = [R("a-very-long-host-name.example.test", 123_456), R("b", 7)];
        let cols = select(&COLS, None).expect("default columns");
        let text = render(&cols, &rows, &View::new(false), Some(20));
        for line in text.lines() {
            assert!(line.chars().count() <= 20, "{line:?} in\n{text}");
        }
        assert!(text.contains('…'), "{text}");
        assert!(text.contains("123456"), "{text}");
        let wide = render(&cols, &rows, &View::new(false), None);
        assert!(
            wide.contains("a-very-long-host-name.example.test"),
            "{wide}"
        );
    }

    #[test]
    fn columns_are_chosen_by_key_and_unknown_keys_named() {
        let cols = select(&COLS, Some("n")).expect("known key");
        assert_eq!(cols.len(), 1);
        let err = select(&COLS, Some("n,bogus")).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown column \"bogus\": choose from name,n")
        );
    }

    #[test]
    fn pages_fit_the_width_line_up_and_print_the_header_once() {
        let cols = select(&COLS, None).expect("default columns");
        let mut pager = Pager::new(cols, View::new(false), Some(20));
        let first = pager.page(&[R("a-very-long-host-name.example.test", 7)]);
        let second = pager.page(&[R("b", 12)]);
        assert_eq!(first[0].trim_end(), "NAME              N");
        assert_eq!(first.len(), 2);
        assert_eq!(second.len(), 1, "{second:?}");
        for line in first.iter().chain(&second) {
            assert!(line.chars().count() <= 20, "{line:?}");
        }
        assert_eq!(first[1], "a-very-long-host… 7");
        assert_eq!(second[0], "b                12");
        let mut wide = Pager::new(select(&COLS, None).expect("cols"), View::new(false), None);
        let lines = wide.page(&[R("a-very-long-host-name.example.test", 7)]);
        assert_eq!(lines[1], "a-very-long-host-name.example.test 7");
    }

    #[test]
    fn sizes_and_durations_read_at_a_glance() {
        assert_eq!(bytes(512), "512");
        assert_eq!(bytes(10 * 1024), "10.0 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(size(1), "1 byte");
        assert_eq!(size(10_737_418_240), "10737418240 bytes (10.0 GiB)");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(7380)), "2h03m");
    }
}
