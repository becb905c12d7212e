//! Numbers on the command line: decimal, or hexadecimal with a `0x` prefix.

use core::fmt;

/// Why a number did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumberError {
    /// Nothing (or only `0x`) where a number was expected.
    Empty,
    /// A character that is not a digit of the number's base.
    BadDigit,
    /// The value does not fit in 64 bits.
    Overflow,
}

impl fmt::Display for NumberError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NumberError::Empty => "empty number",
            NumberError::BadDigit => "not a decimal or 0x-hex number",
            NumberError::Overflow => "number does not fit in 64 bits",
        })
    }
}

/// Parses `123` or `0x7b` (also `0X7B`). No sign, no separators, no octal.
pub fn parse_u64(s: &str) -> Result<u64, NumberError> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return Err(NumberError::Empty);
    }
    let mut value: u64 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix).ok_or(NumberError::BadDigit)?;
        value = value
            .checked_mul(u64::from(radix))
            .and_then(|v| v.checked_add(u64::from(d)))
            .ok_or(NumberError::Overflow)?;
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_hex() {
        assert_eq!(parse_u64("0"), Ok(0));
        assert_eq!(parse_u64("4096"), Ok(4096));
        assert_eq!(parse_u64("0x1000"), Ok(4096));
        assert_eq!(parse_u64("0XfF"), Ok(255));
        assert_eq!(parse_u64("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_u64("0xffffffffffffffff"), Ok(u64::MAX));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_u64(""), Err(NumberError::Empty));
        assert_eq!(parse_u64("0x"), Err(NumberError::Empty));
        assert_eq!(parse_u64("-1"), Err(NumberError::BadDigit));
        assert_eq!(parse_u64("+1"), Err(NumberError::BadDigit));
        assert_eq!(parse_u64("12a"), Err(NumberError::BadDigit));
        assert_eq!(parse_u64("0x12g"), Err(NumberError::BadDigit));
        assert_eq!(parse_u64(" 1"), Err(NumberError::BadDigit));
        assert_eq!(parse_u64("1_000"), Err(NumberError::BadDigit));
        assert_eq!(
            parse_u64("18446744073709551616"),
            Err(NumberError::Overflow)
        );
        assert_eq!(parse_u64("0x10000000000000000"), Err(NumberError::Overflow));
    }
}
