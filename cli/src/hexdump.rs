//! Bytes as an editable hex dump and back: what `held show` prints and `held edit` opens
//! for a packet that is not valid UTF-8, and the hex that `--replace-hex` and `--match-hex`
//! take.

/// Why hex text could not be read back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    /// A character that is not a hex digit.
    #[error("line {line}: {found:?} is not a hex digit")]
    NotHex { line: usize, found: char },
    /// A lone digit at the end of a group.
    #[error("line {line}: odd number of hex digits in {group:?}")]
    Odd { line: usize, group: String },
}

/// The dump: 16 bytes a line as `OFFSET: hex bytes  |text|`.
pub fn dump(data: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in data.chunks(16).enumerate() {
        // One group a byte, spaced for editing: a layout, not proto::hex's plain encoding.
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "{:08x}: {:<47}  |{text}|\n",
            i * 16,
            hex.join(" ")
        ));
    }
    out
}

/// Reads a dump back, as a user may have edited it: lines starting with `#` are comments,
/// a leading `OFFSET:` and everything from the first `|` on are ignored, and the rest of
/// each line is hex bytes (separated by spaces or not).
pub fn parse_dump(text: &str) -> Result<Vec<u8>, HexError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let hex = line.split('|').next().unwrap_or("");
        let hex = match hex.split_once(':') {
            Some((offset, rest))
                if offset.len() == 8 && offset.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                rest
            }
            _ => hex,
        };
        parse_line(hex, n + 1, &mut out)?;
    }
    Ok(out)
}

/// Plain hex such as `48656c6c6f` or `48 65 6c`; whitespace separates groups.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, HexError> {
    let mut out = Vec::new();
    parse_line(text, 1, &mut out)?;
    Ok(out)
}

fn parse_line(text: &str, line: usize, out: &mut Vec<u8>) -> Result<(), HexError> {
    for group in text.split_whitespace() {
        if let Some(found) = group.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(HexError::NotHex { line, found });
        }
        if group.len() % 2 != 0 {
            return Err(HexError::Odd {
                line,
                group: group.into(),
            });
        }
        for i in (0..group.len()).step_by(2) {
            // Two ASCII hex digits, checked above.
            out.push(u8::from_str_radix(&group[i..i + 2], 16).unwrap_or(0));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_round_trips_any_bytes() {
        let data: Vec<u8> = (0..=255u8).chain([b'|', b':', 0]).collect();
        let d = dump(&data);
        assert!(d.starts_with("00000000: 00 01 02"));
        assert_eq!(parse_dump(&d).unwrap(), data);
        assert_eq!(parse_dump("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn edited_dumps_parse() {
        let text = "# a comment\n00000000: 48 65  |He|\n6c6c 6f\n\n00000010: 00 |x|\n";
        assert_eq!(parse_dump(text).unwrap(), b"Hello\0");
        assert_eq!(
            parse_dump("00000000: 4g").unwrap_err(),
            HexError::NotHex {
                line: 1,
                found: 'g'
            }
        );
        assert!(matches!(
            parse_dump("x\n00000000: 123").unwrap_err(),
            HexError::NotHex { line: 1, .. }
        ));
    }

    #[test]
    fn plain_hex() {
        assert_eq!(parse_hex("00ff 10").unwrap(), [0, 255, 16]);
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
        assert!(matches!(parse_hex("abc"), Err(HexError::Odd { .. })));
        assert!(matches!(parse_hex("0x10"), Err(HexError::NotHex { .. })));
    }
}
