//! Byte sizes as the command line takes them (`--history-max-bytes 10GiB`,
//! `--max-held-bytes 64MiB`): one parser, so every flag accepts the same units and says the
//! same thing about a bad one.

/// A byte size: a number with an optional unit (B, KB, MB, GB, TB in powers of 1000; KiB,
/// MiB, GiB, TiB in powers of 1024; K, M, G, T as KB, MB, GB, TB; case-insensitive, spaces
/// allowed before the unit). The error names what was wrong, for clap to show.
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 500MiB, 10GiB, 0)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1000_u64.pow(2),
        "gb" | "g" => 1000_u64.pow(3),
        "tb" | "t" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("10GiB"), Ok(10 << 30));
        assert_eq!(parse("2 mb"), Ok(2_000_000));
        assert_eq!(parse("64KiB"), Ok(65_536));
        assert_eq!(parse(" 3T "), Ok(3_000_000_000_000));
        assert_eq!(parse("1tib"), Ok(1 << 40));
        assert!(parse("ten").unwrap_err().contains("is not a size"));
        assert!(parse("").unwrap_err().contains("is not a size"));
        assert!(parse("-1").unwrap_err().contains("is not a size"));
        assert!(
            parse("5 parsecs")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(parse("99999999999TiB").unwrap_err().contains("too large"));
    }
}
