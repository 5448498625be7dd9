//! Post-copy on the source (`ferry migrate --post-copy`): after the
//! destination resumed the process with the last round's dirty pages
//! missing, serve them from the frozen source until the destination says
//! every page is in.
//!
//! Two streams carry the pages: one for the pages the process faulted on
//! (the destination asks with `PageRequest`; each is read and sent at
//! once, on a stream QUIC sends before the other), and one on which every
//! page of the post-copy ranges is pushed in address order in the
//! background, optionally at a bounded rate. A page can travel both ways;
//! the destination places it once.
//!
//! The source stays frozen the whole time (its memory is where the missing
//! pages come from) and can no longer take over: the destination's copy
//! has run. What ends post-copy without `PostCopyDone` — the connection
//! lost, the page server giving up — leaves the source stopped, not
//! running, and is reported as such by [`crate::migrate`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_proto::batch::{Compress, Encoder};
use ferry_proto::pb;
use ferry_proto::{LAZY_PUSH_LAYER, LAZY_URGENT_LAYER};

use crate::client::{ClientError, LazyLink, LazyStream};
use crate::sys::vm::{self, VmError};

/// Pages per background batch: small enough that a requested page never
/// waits long behind one at the destination.
const PUSH_PAGES: u64 = 64;
/// Most pages one request may ask for.
const MAX_REQUEST_PAGES: u32 = 1024;

/// How post-copy runs.
#[derive(Debug, Clone, Default)]
pub struct PostCopyOptions {
    /// Bytes per second for the background push; `None` for as fast as
    /// the connection goes.
    pub bandwidth: Option<u64>,
}

/// What post-copy did, the destination's figures included.
#[derive(Debug, Clone, Default)]
pub struct PostCopyReport {
    /// Pages left out of the image at the resume.
    pub lazy_pages: u64,
    /// Page requests the source answered.
    pub requests: u64,
    /// Pages the background push sent before the end.
    pub pushed_pages: u64,
    /// Faults on missing pages (each one a request), and faults the
    /// destination served alone (pages already in, or never in the image).
    pub faults: u64,
    pub local_faults: u64,
    /// Fault to page in place, at the destination.
    pub fault_median_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// From the resume to the last page in place, at the destination.
    pub last_page: Duration,
    /// From `Restored` to `PostCopyDone`, at the source.
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    #[error("the connection to the page server failed with pages still missing: {0}")]
    Lost(#[source] ClientError),
    #[error("the page server gave up: {0}")]
    Aborted(String),
    #[error("reading the frozen source's memory: {0}")]
    Read(#[from] VmError),
    #[error("unexpected message from the page server: {0}")]
    Unexpected(String),
    #[error("page request {addr:#x} (+{pages} pages) outside the post-copy ranges")]
    BadRequest { addr: u64, pages: u32 },
    /// Two-phase end: `Go` went out, the answer was lost and the link with
    /// it; the page server says the released process died for want of its
    /// pages.
    #[error("the answer after Go was lost ({error}), and the link with it: {fate}")]
    LostAfterGo { error: String, fate: String },
}

/// Serves the missing pages of `ranges` from the frozen process `pid`
/// until the destination has them all.
pub async fn serve(
    mut link: LazyLink,
    pid: i32,
    ranges: Vec<(u64, u64)>,
    opts: &PostCopyOptions,
) -> Result<PostCopyReport, PostCopyError> {
    let t0 = Instant::now();
    let ps = u64::from(link.page_size());
    let addr = link.addr();
    let lazy_pages = ranges.iter().map(|(s, e)| (e - s) / ps).sum();
    let mut urgent = link.open_stream(1).await.map_err(PostCopyError::Lost)?;
    let push_stream = link.open_stream(0).await.map_err(PostCopyError::Lost)?;
    let pusher = tokio::spawn(push(
        push_stream,
        pid,
        ranges.clone(),
        ps,
        opts.bandwidth,
        addr,
    ));
    let mut enc = Encoder::new(ps as u32, Compress::Off);
    let mut buf = Vec::new();
    let mut requests = 0u64;
    let result = loop {
        let msg = match link.next_message().await {
            Ok(m) => m.msg,
            Err(e) => break Err(PostCopyError::Lost(e)),
        };
        match msg {
            Some(pb::control::Msg::PageRequest(r)) => {
                let end = r.addr.saturating_add(u64::from(r.pages) * ps);
                let inside = r.pages > 0
                    && r.pages <= MAX_REQUEST_PAGES
                    && r.addr % ps == 0
                    && ranges.iter().any(|&(s, e)| s <= r.addr && end <= e);
                if !inside {
                    break Err(PostCopyError::BadRequest {
                        addr: r.addr,
                        pages: r.pages,
                    });
                }
                let at = r.addr;
                if let Err(e) =
                    tokio::task::block_in_place(|| vm::read_ranges(pid, &[(at, end)], &mut buf))
                {
                    break Err(e.into());
                }
                let data = Bytes::from(std::mem::take(&mut buf));
                let b = match enc.encode(LAZY_URGENT_LAYER, requests as u32, [(at, data)]) {
                    Ok(b) => b,
                    Err(e) => break Err(PostCopyError::Unexpected(e.to_string())),
                };
                if let Err(e) = urgent.write(b, addr).await {
                    break Err(PostCopyError::Lost(e));
                }
                requests += 1;
            }
            Some(pb::control::Msg::PostCopyDone(d)) => break Ok(d),
            Some(pb::control::Msg::Abort(a)) => break Err(PostCopyError::Aborted(a.reason)),
            other => break Err(PostCopyError::Unexpected(format!("{other:?}"))),
        }
    };
    pusher.abort();
    let pushed_pages = pusher.await.ok().and_then(|r| r.ok()).unwrap_or(0);
    match result {
        Ok(d) => {
            let elapsed = t0.elapsed();
            link.close(0, b"post-copy done").await;
            Ok(PostCopyReport {
                lazy_pages,
                requests,
                pushed_pages,
                faults: d.faults,
                local_faults: d.local_faults,
                fault_median_us: d.fault_median_us,
                fault_p99_us: d.fault_p99_us,
                fault_max_us: d.fault_max_us,
                last_page: Duration::from_micros(d.elapsed_us),
                elapsed,
            })
        }
        Err(e) => {
            link.abort(&e.to_string()).await;
            Err(e)
        }
    }
}

/// Pushes every page of `ranges` in address order; returns the pages sent.
async fn push(
    mut stream: LazyStream,
    pid: i32,
    ranges: Vec<(u64, u64)>,
    ps: u64,
    bandwidth: Option<u64>,
    addr: SocketAddr,
) -> Result<u64, PostCopyError> {
    let t0 = Instant::now();
    let mut enc = Encoder::new(ps as u32, Compress::Off);
    let mut buf = Vec::new();
    let (mut sent, mut bytes) = (0u64, 0u64);
    for (seq, batch) in crate::dump::split(&ranges, PUSH_PAGES * ps)
        .into_iter()
        .enumerate()
    {
        tokio::task::block_in_place(|| vm::read_ranges(pid, &batch, &mut buf))?;
        let all = Bytes::from(std::mem::take(&mut buf));
        let mut off = 0usize;
        let parts: Vec<(u64, Bytes)> = batch
            .iter()
            .map(|&(s, e)| {
                let p = all.slice(off..off + (e - s) as usize);
                off += (e - s) as usize;
                (s, p)
            })
            .collect();
        let n = batch.iter().map(|(s, e)| e - s).sum::<u64>();
        let b = enc
            .encode(LAZY_PUSH_LAYER, seq as u32, parts)
            .map_err(|e| PostCopyError::Unexpected(e.to_string()))?;
        stream.write(b, addr).await.map_err(PostCopyError::Lost)?;
        sent += n / ps;
        bytes += n;
        if let Some(bw) = bandwidth.filter(|&b| b > 0) {
            let due = t0 + Duration::from_secs_f64(bytes as f64 / bw as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    stream.finish();
    Ok(sent)
}
