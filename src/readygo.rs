//! The destination's half of the two-phase end of a migration (`Ready`,
//! `Go`; see `ferry_proto::session`): a restored process is *prepared* —
//! every thread of every process stopped under ptrace with its final state
//! set — and then either *released* (detached: it runs) or *abandoned*
//! (killed and reaped). Nothing in between: a stub is never left stopped,
//! nor let run half-restored.
//!
//! ptrace requests must come from the thread that attached, so the restore
//! thread itself holds the prepared process and waits at a [`Gate`] for
//! the verdict; the page server's session task holds the matching
//! [`Prepared`] and gives it (`release`, `abandon`, or dropping it, which
//! abandons). The stubs carry `PTRACE_O_EXITKILL`, so a page server that
//! dies while holding a prepared process takes it along rather than
//! letting it run unasked.

use std::sync::mpsc;

use crate::restore::RestoreError;

/// The restore thread's side: say the process is prepared, then wait.
pub struct Gate {
    ready: mpsc::Sender<i32>,
    go: mpsc::Receiver<()>,
}

impl Gate {
    /// Reports `pid` prepared and blocks until the verdict: true to
    /// release, false to abandon (the holder gave up or went away).
    pub fn wait(self, pid: i32) -> bool {
        if self.ready.send(pid).is_err() {
            return false;
        }
        self.go.recv().is_ok()
    }
}

/// How the restore thread ends, once the verdict is carried out: the pid
/// of the running process (with post-copy, also the userfaultfd its
/// missing pages wait on: `T`), or why there is none.
pub type Joiner<T = i32> = Box<dyn FnOnce() -> Result<T, RestoreError> + Send>;

/// The holder's side of a prepared process; `T` is what a release yields.
pub struct Prepared<T = i32> {
    pid: i32,
    /// With `--keep-pids`: the root's pid inside its new pid namespace and
    /// that namespace's inode (zeros otherwise).
    ns: (i32, u64),
    go: Option<mpsc::Sender<()>>,
    join: Option<Joiner<T>>,
}

/// The pair for one restore: the [`Gate`] goes to the restore thread, the
/// [`Waiting`] stays with the caller until the thread reports.
pub fn gate() -> (Gate, Waiting) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    (
        Gate {
            ready: ready_tx,
            go: go_rx,
        },
        Waiting {
            ready: ready_rx,
            go: go_tx,
        },
    )
}

/// A restore under way whose [`Gate`] has not been reached yet.
pub struct Waiting {
    ready: mpsc::Receiver<i32>,
    go: mpsc::Sender<()>,
}

impl Waiting {
    /// Waits until the restore thread holds the process prepared, or ends
    /// without (then `join` says why, and `Err` carries it).
    pub fn prepared<T>(self, join: Joiner<T>) -> Result<Prepared<T>, RestoreError> {
        match self.ready.recv() {
            Ok(pid) => Ok(Prepared {
                pid,
                ns: (0, 0),
                go: Some(self.go),
                join: Some(join),
            }),
            Err(_) => {
                drop(self.go);
                Err(match join() {
                    Err(e) => e,
                    Ok(_) => RestoreError::Thread(
                        "the restore let its process run without waiting for Go".into(),
                    ),
                })
            }
        }
    }
}

impl<T> Prepared<T> {
    /// The prepared process (the root of a tree).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Where its pids live: `(ns_pid, pid_ns)` when it was prepared in a
    /// pid namespace of its own (`--keep-pids`), else zeros.
    pub fn ns(&self) -> (i32, u64) {
        self.ns
    }

    /// Records the pid namespace it was prepared in (known only once the
    /// process exists, before it runs).
    pub fn in_ns(mut self, ns_pid: i32, pid_ns: u64) -> Self {
        self.ns = (ns_pid, pid_ns);
        self
    }

    /// Lets the process run; returns its pid (`T`) once every thread is
    /// detached. On an error nothing of it runs (it was killed).
    pub fn release(mut self) -> Result<T, RestoreError> {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
        self.join
            .take()
            .map(|j| j())
            .unwrap_or_else(|| Err(RestoreError::Thread("released twice".into())))
    }

    /// Kills the prepared process and waits until it is gone.
    pub fn abandon(mut self) {
        self.finish_abandon();
    }

    fn finish_abandon(&mut self) {
        self.go.take();
        if let Some(j) = self.join.take() {
            match j() {
                Err(RestoreError::Abandoned) => {}
                Err(e) => tracing::warn!(pid = self.pid, "abandoning the prepared process: {e}"),
                Ok(_) => tracing::error!(pid = self.pid, "an abandoned process was let run"),
            }
        }
    }
}

impl<T> Drop for Prepared<T> {
    fn drop(&mut self) {
        self.finish_abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in restore thread: reports `pid` prepared, then returns
    /// what the gate decided.
    fn thread(pid: i32) -> (Waiting, Joiner) {
        let (g, w) = gate();
        let h = std::thread::spawn(move || match g.wait(pid) {
            true => Ok(pid),
            false => Err(RestoreError::Abandoned),
        });
        let join: Joiner = Box::new(move || h.join().expect("thread"));
        (w, join)
    }

    #[test]
    fn release_and_abandon_reach_the_restore_thread() {
        let (w, j) = thread(7);
        let p = w.prepared(j).unwrap();
        assert_eq!(p.pid(), 7);
        assert_eq!(p.ns(), (0, 0));
        let p = p.in_ns(3, 4026531836);
        assert_eq!(p.ns(), (3, 4026531836));
        assert_eq!(p.release().unwrap(), 7);

        let (w, j) = thread(8);
        w.prepared(j).unwrap().abandon();
        // Dropping abandons too (the join inside waits for the thread).
        let (w, j) = thread(9);
        drop(w.prepared(j).unwrap());
    }

    #[test]
    fn a_restore_that_fails_before_the_gate_says_why() {
        let (g, w) = gate();
        let h = std::thread::spawn(move || {
            drop(g);
            Err::<i32, _>(RestoreError::Missing("state".into()))
        });
        let e = w
            .prepared(Box::new(move || h.join().unwrap()))
            .err()
            .unwrap();
        assert!(matches!(e, RestoreError::Missing(_)), "{e}");
    }
}
