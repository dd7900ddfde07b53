//! Range checks of integer command-line flags as they are parsed, written once for every binary
//! (`model`, `labeling`, the stages' shared arguments): a clap value parser whose error says
//! what is allowed, as the config keys' range checks do; clap puts the flag and the value in
//! front: `invalid value '-1' for '--seed <SEED>': out of range; it must be an integer ≥ 0`.
//!
//! A flag that uses it also sets `allow_negative_numbers`, so that `-1` reaches the parser (an
//! unsigned type cannot hold it, so it is refused here, as a range error) instead of being read
//! as an unknown flag. Number flags (`--temperature`, `--top-p`, `--noise`) are parsed as given,
//! negative ones included, and checked with the rest of their command's flags afterwards
//! ([`crate::generate::SamplingArgs::problems`]), each error naming the flag, the value and the
//! range.

use std::fmt::Display;
use std::str::FromStr;

/// An integer flag ≥ `min` (`at_least::<u64>(0)` for a seed: any non-negative integer).
pub fn at_least<T>(min: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |s: &str| {
        let range = format!("an integer ≥ {min}");
        match (s.trim().parse::<T>(), s.trim().parse::<f64>()) {
            (Ok(v), _) if v >= min => Ok(v),
            (_, Ok(v)) if v.fract() == 0.0 => Err(format!("out of range; it must be {range}")),
            (_, Ok(_)) => Err(format!("not an integer; it must be {range}")),
            _ => Err(format!("not a number; it must be {range}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_range_parse_and_others_name_the_range() {
        let count = at_least::<usize>(1);
        assert_eq!(count("3"), Ok(3));
        for (bad, why) in [
            ("0", "out of range"),
            ("-2", "out of range"),
            ("1e30", "out of range"),
            ("2.5", "not an integer"),
            ("two", "not a number"),
        ] {
            assert_eq!(
                count(bad).unwrap_err(),
                format!("{why}; it must be an integer ≥ 1"),
                "{bad}"
            );
        }
        assert_eq!(at_least::<u64>(0)("0"), Ok(0));
        assert_eq!(
            at_least::<u64>(0)("-1").unwrap_err(),
            "out of range; it must be an integer ≥ 0"
        );
    }
}
