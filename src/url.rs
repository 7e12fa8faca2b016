//! Percent-decoding, for `RABBITMQ_URL` and for query strings.

use anyhow::{anyhow, Context, Result};

/// Decodes `%XX` escapes (and, when `plus_is_space`, `+` as in query strings).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(|| anyhow!("bad %-escape"))?;
                out.push(u8::from_str_radix(hex, 16).context("bad %-escape")?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).context("not UTF-8 once decoded")
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_escapes() {
        assert_eq!(percent_decode("%2f", false).unwrap(), "/");
        assert_eq!(percent_decode("a+b%20c", true).unwrap(), "a b c");
        assert!(percent_decode("%zz", false).is_err());
        assert!(percent_decode("%2", false).is_err());
    }
}
