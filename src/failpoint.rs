//! Test-only failure injection: `FERRY_FAILPOINT=AREA:SITE` (for example
//! `restore:files`) in the environment of a ferry process makes the code at
//! that site fail as if the step had. It is read once, on the first check;
//! without the variable every check is a cheap no-op. It exists so that
//! tests can fail a step that has no natural way to fail on demand, and
//! show that nothing is lost when it does: never set it in production.

use std::sync::OnceLock;

/// The variable's name.
pub const VAR: &str = "FERRY_FAILPOINT";

/// Whether `area:site` is the armed failpoint.
pub fn armed(area: &str, site: &str) -> bool {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(VAR).ok())
        .as_deref()
        .is_some_and(|a| matches_site(a, area, site))
}

/// Ends this ferry process at once, as `kill -9` would: for failpoints
/// that stand for ferry being killed at that point.
pub fn die() -> ! {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

fn matches_site(armed: &str, area: &str, site: &str) -> bool {
    armed.split_once(':') == Some((area, site))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_site_is_armed() {
        assert!(matches_site("restore:files", "restore", "files"));
        assert!(!matches_site("restore:files", "restore", "mm"));
        assert!(!matches_site("restore:files", "dump", "files"));
        assert!(!matches_site("restore", "restore", ""));
        assert!(!matches_site("", "restore", "files"));
    }
}
