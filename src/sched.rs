//! What of a thread's scheduling travels, and how a CPU mask recorded on
//! one host is read on another. Pure: the calls are in
//! [`crate::sys::sched`].
//!
//! A mask that allows every CPU online on the source is the default a
//! thread inherits, not a choice: it is recorded as empty ("any CPU"), so
//! a restored thread may use every CPU of a larger destination. A real
//! pinning is kept, cut to the CPUs the destination has; if none of them
//! is there, the thread runs on any (and the restore says so).

/// The CPUs of a kernel CPU list such as `/sys/devices/system/cpu/online`
/// (`0-3,8,10-11`), as 64-bit words, bit `n % 64` of word `n / 64` for
/// CPU `n`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u64>, String> {
    let mut words = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n < 1 << 16)
                .ok_or_else(|| format!("not a CPU number: {s:?}"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi {
            return Err(format!("a CPU range backwards: {part:?}"));
        }
        for cpu in lo..=hi {
            if words.len() <= cpu / 64 {
                words.resize(cpu / 64 + 1, 0);
            }
            words[cpu / 64] |= 1 << (cpu % 64);
        }
    }
    Ok(words)
}

/// The CPUs online on this host, if `/sys` says.
pub fn online_cpus() -> Option<Vec<u64>> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|t| parse_cpu_list(&t).ok())
}

fn word(mask: &[u64], i: usize) -> u64 {
    mask.get(i).copied().unwrap_or(0)
}

/// What the image records of a thread allowed `mask` on a host whose CPUs
/// online are `online`: empty if it allows all of them (unpinned), else
/// the mask.
pub fn recorded(mask: &[u64], online: Option<&[u64]>) -> Vec<u64> {
    let all = online.is_some_and(|on| (0..on.len()).all(|i| word(mask, i) & on[i] == on[i]));
    if all || mask.iter().all(|&w| w == 0) {
        Vec::new()
    } else {
        mask.to_vec()
    }
}

/// The mask to set on the destination for `recorded`: its CPUs that are
/// online here. `None`: leave the thread as it is (unpinned, or none of
/// its CPUs is here).
pub fn here(recorded: &[u64], online: Option<&[u64]>) -> Option<Vec<u64>> {
    if recorded.is_empty() {
        return None;
    }
    let mut mask: Vec<u64> = match online {
        Some(on) => (0..recorded.len())
            .map(|i| recorded[i] & word(on, i))
            .collect(),
        None => recorded.to_vec(),
    };
    while mask.last() == Some(&0) {
        mask.pop();
    }
    (!mask.is_empty()).then_some(mask)
}

/// `0-1,4` for a mask, as the kernel writes CPU lists.
pub fn cpu_list(mask: &[u64]) -> String {
    let cpus: Vec<usize> = (0..mask.len() * 64)
        .filter(|&c| mask[c / 64] & (1 << (c % 64)) != 0)
        .collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(parse_cpu_list("0-1\n").unwrap(), [0b11]);
        assert_eq!(parse_cpu_list("0,2-3,64").unwrap(), [0b1101, 1]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<u64>::new());
        for bad in ["x", "3-1", "1-", "99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
        assert_eq!(cpu_list(&[0b1101, 1]), "0,2-3,64");
        assert_eq!(cpu_list(&[]), "");
    }

    #[test]
    fn the_default_mask_is_recorded_as_any_cpu() {
        let on = [0b11u64];
        assert!(recorded(&[0b11], Some(&on)).is_empty());
        assert!(recorded(&[u64::MAX, u64::MAX], Some(&on)).is_empty());
        assert_eq!(recorded(&[0b10], Some(&on)), [0b10]);
        // Unknown online set: only an empty mask means "any".
        assert_eq!(recorded(&[0b11], None), [0b11]);
    }

    #[test]
    fn a_pinning_is_cut_to_the_cpus_here() {
        assert_eq!(here(&[], Some(&[0b11])), None);
        assert_eq!(here(&[0b110], Some(&[0b11])), Some(vec![0b10]));
        assert_eq!(here(&[0b100], Some(&[0b11])), None, "CPU 2 is not here");
        assert_eq!(here(&[0, 1], Some(&[0b11])), None);
        assert_eq!(here(&[0, 1], None), Some(vec![0, 1]));
    }
}
