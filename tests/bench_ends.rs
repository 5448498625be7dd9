//! `ferry bench --separate-ends`: the two ends of a migration on separate
//! CPUs, and the CPU-per-MiB figures every mode reports. Runs the real
//! binary (root: it seizes and restores the workload).

use std::process::Command;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn cpus() -> usize {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .count()
        })
        .unwrap_or(1)
}

#[test]
fn separate_ends_report_cpu_per_mib_and_the_transport_ratios() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    if cpus() < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("b.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["bench", "--size", "16", "--runs", "1", "--log", "error"])
        .args(["--content", "random", "--modes", "iterative,tcp"])
        .arg("--separate-ends")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("separate ends"), "{stdout}");
    assert!(stdout.contains("r0 CPU/MiB"), "{stdout}");
    assert!(stdout.contains("the CPU per MiB of plain TCP"), "{stdout}");
    // No busy workload, so neither a slowdown nor its control.
    assert!(!stdout.contains("control, no migration"), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let modes = v.as_array().unwrap();
    assert_eq!(modes.len(), 2);
    for m in modes {
        let run = &m["runs"][0];
        assert_eq!(run["verified_pages"].as_u64(), Some(4096), "{m}");
        assert!(run["slowdown"].is_null(), "{m}");
        // 16 MiB of random pages went over the wire: some CPU per MiB, but
        // not a second of it.
        let per_mib = m["cpu_ms_per_mib"]["round0_wire"]["median"]
            .as_f64()
            .unwrap();
        assert!(per_mib > 0.0 && per_mib < 1000.0, "{m}");
        assert!(run["cpu_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["vs_tcp"]["cpu_ms_per_mib"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert_eq!(modes[1]["vs_tcp"]["round0_wire"].as_f64(), Some(1.0));
}

#[test]
fn separate_ends_refuse_no_pin() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["bench", "--separate-ends", "--no-pin"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
