//! The page server's limits as numbers: sizes written with K/M/G suffixes
//! on the command line, and the default memory quota taken from the
//! host's physical memory. Pure functions, so the CLI and the server agree
//! on them and they are tested without a host.

/// Why a size on the command line is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size {0:?}: expected a number of bytes with an optional K, M, G or T suffix (powers of 1024), or \"none\"")]
    Syntax(String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// A size in bytes: `4096`, `512K`, `64M`, `8G`, `1T` (binary multiples;
/// a trailing `B`/`iB` is allowed, `8GiB`). `none` (or `unlimited`) is
/// `u64::MAX`, a limit that is never hit.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") || t.eq_ignore_ascii_case("unlimited") {
        return Ok(u64::MAX);
    }
    let syntax = || SizeError::Syntax(s.to_string());
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(syntax());
    }
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("iB")
        .or_else(|| unit.strip_suffix("ib"))
        .or_else(|| unit.strip_suffix(['B', 'b']))
        .unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(syntax()),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// A size for people and error messages: `64 MiB`, `1.5 GiB`, `none`.
pub fn show_size(n: u64) -> String {
    if n == u64::MAX {
        return "none".into();
    }
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut f = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = f.next()?.parse().ok()?;
    match f.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Share of physical memory the `mem` store may hold by default: the rest
/// is for the restored processes and the host.
pub const DEFAULT_MEM_SHARE_PERCENT: u64 = 50;

/// Used when physical memory cannot be read: small enough for any host a
/// process worth migrating runs on.
pub const FALLBACK_MEM_QUOTA: u64 = 4 << 30;

/// The default total quota of the `mem` store for a host whose
/// `/proc/meminfo` reads `meminfo` (`None` if it could not be read).
pub fn default_mem_quota(meminfo: Option<&str>) -> u64 {
    meminfo
        .and_then(mem_total)
        .map(|t| (t as u128 * DEFAULT_MEM_SHARE_PERCENT as u128 / 100) as u64)
        .unwrap_or(FALLBACK_MEM_QUOTA)
}

/// Physical memory of this host, for the defaults that scale with it.
pub fn host_mem_total() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .as_deref()
        .and_then(mem_total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        for (s, n) in [
            ("0", 0),
            ("4096", 4096),
            ("512K", 512 << 10),
            ("512k", 512 << 10),
            ("64M", 64 << 20),
            ("64MiB", 64 << 20),
            ("64MB", 64 << 20),
            (" 8G ", 8 << 30),
            ("8 G", 8 << 30),
            ("2T", 2 << 40),
            ("none", u64::MAX),
            ("unlimited", u64::MAX),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in ["", "G", "-1", "1.5G", "12X", "0x10", "10 GG", "K10"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Syntax(_))),
                "{bad}: {:?}",
                parse_size(bad)
            );
        }
        assert!(matches!(
            parse_size("16777216T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_show_in_binary_units() {
        assert_eq!(show_size(0), "0 B");
        assert_eq!(show_size(1000), "1000 B");
        assert_eq!(show_size(64 << 20), "64 MiB");
        assert_eq!(show_size(3 << 29), "1.5 GiB");
        assert_eq!(show_size(u64::MAX), "none");
    }

    #[test]
    fn mem_quota_defaults_to_half_the_host() {
        let info = "MemTotal:       16318464 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(info), Some(16318464 * 1024));
        assert_eq!(default_mem_quota(Some(info)), 16318464 * 1024 / 2);
        assert_eq!(default_mem_quota(None), FALLBACK_MEM_QUOTA);
        assert_eq!(
            default_mem_quota(Some("MemFree: 1 kB\n")),
            FALLBACK_MEM_QUOTA
        );
        assert_eq!(mem_total("MemTotal: x kB"), None);
        assert_eq!(mem_total("MemTotal: 10 MB"), None);
        // This host's own file parses.
        if let Ok(s) = std::fs::read_to_string("/proc/meminfo") {
            assert!(mem_total(&s).is_some_and(|n| n > 0));
        }
    }
}
