//! Tables that fit the terminal: the columns a tester scans for, long values (hosts, reasons)
//! cut with an ellipsis so every row stays one line, and `--columns` / `--wide` to choose.
//! Full values are always in `--json`.

use std::time::{Duration, SystemTime};

use anyhow::bail;
use comfy_table::{Cell, CellAlignment, ColumnConstraint, ContentArrangement, Row, Table, presets};

/// How cells render values that depend on the reader: local or UTC times, and "now" for the
/// duration of what is still open.
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
        let t: chrono::DateTime<chrono::Utc> = t.into();
        if self.local_time {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S%:z")
                .to_string()
        } else {
            t.format("%Y-%m-%d %H:%M:%SZ").to_string()
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
    Table::new().width()
}

/// The table of `rows` as text lines (header first), each at most `width` columns wide: long
/// values are cut first, then the lowest-ranked columns left out.
pub fn render<T>(columns: &[&Column<T>], rows: &[T], view: &View, width: Option<u16>) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| (c.cell)(r, view)).collect())
        .collect();
    let mut shown: Vec<usize> = (0..columns.len()).collect();
    if let Some(w) = width {
        // The width each column needs: its widest value, or for a shrinking column at most
        // MIN_SHRUNK; one space between columns.
        let need: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let widest = cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([c.header.len()])
                    .max()
                    .unwrap_or(0);
                if c.shrinks {
                    widest.min(MIN_SHRUNK)
                } else {
                    widest
                }
            })
            .collect();
        while shown.len() > 1 && shown.iter().map(|&i| need[i] + 1).sum::<usize>() > usize::from(w)
        {
            let Some(pos) =
                (0..shown.len()).min_by_key(|&p| (columns[shown[p]].rank, usize::MAX - p))
            else {
                break;
            };
            shown.remove(pos);
        }
    }
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_truncation_indicator("…")
        .set_header(shown.iter().map(|&i| Cell::new(columns[i].header)));
    match width {
        Some(w) => {
            table
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(w);
        }
        None => {
            table
                .set_content_arrangement(ContentArrangement::Disabled)
                .force_no_tty();
        }
    }
    for r in &cells {
        let mut row = Row::from(shown.iter().map(|&i| {
            let cell = Cell::new(&r[i]);
            if columns[i].right {
                cell.set_alignment(CellAlignment::Right)
            } else {
                cell
            }
        }));
        row.max_height(1);
        table.add_row(row);
    }
    for (pos, &i) in shown.iter().enumerate() {
        let c = columns[i];
        if let Some(col) = table.column_mut(pos) {
            // Columns that do not shrink keep their content's width; the others share what
            // is left and are cut with an ellipsis.
            if !c.shrinks {
                col.set_constraint(ColumnConstraint::ContentWidth);
            }
            // comfy-table pads every cell by one space each side; one between columns is
            // enough.
            col.set_padding((0, 1));
        }
    }
    table
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
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
        },
        Column {
            key: "n",
            header: "N",
            cell: |r, _| r.1.to_string(),
            shrinks: false,
            right: true,
            default: true,
            rank: 8,
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
    fn sizes_and_durations_read_at_a_glance() {
        assert_eq!(bytes(512), "512");
        assert_eq!(bytes(10 * 1024), "10.0 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(7380)), "2h03m");
    }
}
