//! A streaming (SSE) answer on its way to the client: each upstream event is
//! forwarded as soon as it is complete, usage is read on the way, and the
//! request is settled exactly once, however the stream ends.
//!
//! Ends: the upstream finishes (usage as reported, else counted); the upstream
//! breaks or falls silent (counted so far; the client sees the stream abort);
//! the client goes away (this body is dropped): the backend's `on_disconnect`
//! says whether to cancel the upstream request (count what was streamed) or
//! drain it in the background (exact usage from its last chunk).

use std::{
    borrow::Cow,
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use super::{BoxError, Settlement, upstream::UpstreamBody};
use crate::{
    config::OnDisconnect,
    openai::{self, Usage},
    sse::{self, MAX_EVENT_BYTES, SseSplitter},
    tokens,
};

/// Reads usage and generated text out of the events of one stream.
pub struct Meter {
    splitter: SseSplitter,
    tally: Tally,
}

/// What the events seen so far add up to.
struct Tally {
    /// Drop the usage-only chunk kedge asked for and the client did not.
    strip_usage_chunk: bool,
    chunks: openai::ChunkReader,
    reported: Option<Usage>,
    completion_bytes: u64,
    prompt_estimate: u64,
}

impl Tally {
    /// Reads one complete event's data (`None`: a comment or keep-alive);
    /// `false` when the event must not reach the client.
    fn keep(&mut self, data: Option<Cow<'_, [u8]>>) -> bool {
        let Some(data) = data else {
            return true;
        };
        // `[DONE]` and anything else that is not JSON pass through untouched.
        if *data == *b"[DONE]" {
            return true;
        }
        let Some(facts) = self.chunks.read(&data) else {
            return true;
        };
        if facts.usage.is_some() {
            self.reported = facts.usage;
        }
        self.completion_bytes += facts.text_bytes;
        !(self.strip_usage_chunk && facts.usage_only)
    }
}

impl Meter {
    pub fn new(strip_usage_chunk: bool, prompt_estimate: u64) -> Meter {
        Meter {
            splitter: SseSplitter::default(),
            tally: Tally {
                strip_usage_chunk,
                chunks: openai::ChunkReader::default(),
                reported: None,
                completion_bytes: 0,
                prompt_estimate,
            },
        }
    }

    /// Feeds upstream bytes and queues what is to be forwarded, in order:
    /// consecutive complete events that pass leave as one slice.
    fn observe(&mut self, chunk: Bytes, out: &mut VecDeque<Bytes>) -> Result<(), BoxError> {
        self.splitter.extend(chunk);
        let mut kept = 0;
        while let Some(event) = self.splitter.event_at(kept) {
            let len = event.len;
            let raw = &self.splitter.buffered()[kept..kept + len];
            if self.tally.keep(sse::data_of_event(raw, event.first_line)) {
                kept += len;
                continue;
            }
            if kept > 0 {
                out.push_back(self.splitter.take(kept));
            }
            self.splitter.skip(len);
            kept = 0;
        }
        if kept > 0 {
            out.push_back(self.splitter.take(kept));
        }
        if self.splitter.pending() > MAX_EVENT_BYTES {
            return Err("upstream sent an SSE event over the size limit".into());
        }
        Ok(())
    }

    /// The stream ended: an unterminated last event still counts.
    fn finish(&mut self) -> Option<Bytes> {
        let tail = self.splitter.finish()?;
        self.tally.keep(sse::data_of(&tail)).then_some(tail)
    }

    /// Usage as the upstream reported it, else counted from what passed.
    pub fn usage(&self) -> Usage {
        let t = &self.tally;
        t.reported.unwrap_or(Usage {
            prompt_tokens: t.prompt_estimate,
            completion_tokens: tokens::count_bytes(t.completion_bytes),
            reported: false,
        })
    }
}

/// Most bytes held back to coalesce a burst of events into one write.
const COALESCE_BYTES: usize = 64 << 10;

pub struct MeteredStream {
    upstream: Option<UpstreamBody>,
    meter: Meter,
    out: VecDeque<Bytes>,
    /// Fires `idle_timeout` after the last upstream frame. It is moved only
    /// when it fires early, not on every frame (a timer-wheel update per
    /// event is a measurable share of a stream's cost).
    idle: Pin<Box<Sleep>>,
    last_frame: Instant,
    idle_timeout: Duration,
    on_disconnect: OnDisconnect,
    settlement: Option<Settlement>,
    /// Why the stream ends early, reported once what passed is delivered.
    failure: Option<BoxError>,
}

impl MeteredStream {
    pub fn new(
        upstream: UpstreamBody,
        meter: Meter,
        idle_timeout: Duration,
        on_disconnect: OnDisconnect,
        settlement: Settlement,
    ) -> MeteredStream {
        MeteredStream {
            upstream: Some(upstream),
            meter,
            out: VecDeque::new(),
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            last_frame: Instant::from_std(crate::clock::coarse_instant()),
            idle_timeout,
            on_disconnect,
            settlement: Some(settlement),
            failure: None,
        }
    }

    fn settle(&mut self, outcome: &'static str) {
        if let Some(s) = self.settlement.take() {
            s.settle(self.meter.usage(), outcome);
        }
    }

    /// Everything queued for the client, as one frame.
    fn take_out(&mut self) -> Bytes {
        if self.out.len() == 1 {
            return self.out.pop_front().unwrap_or_default();
        }
        let mut all = BytesMut::with_capacity(self.out.iter().map(Bytes::len).sum());
        for part in self.out.drain(..) {
            all.extend_from_slice(&part);
        }
        all.freeze()
    }

    /// The upstream has sent nothing for `idle_timeout`.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.idle.as_mut().poll(cx).is_ready() {
            let deadline = self.last_frame + self.idle_timeout;
            if deadline <= Instant::now() {
                return true;
            }
            self.idle.as_mut().reset(deadline);
        }
        false
    }

    /// Ends the stream early: settle with what passed, drop the upstream,
    /// deliver the events already complete, then fail the client's stream.
    fn abort(&mut self, outcome: &'static str, error: BoxError) {
        self.upstream = None;
        self.settle(outcome);
        self.failure = Some(error);
    }
}

impl HttpBody for MeteredStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        while let Some(upstream) = this.upstream.as_mut() {
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // A tick's precision is plenty for an idle timeout of seconds.
                    this.last_frame = Instant::from_std(crate::clock::coarse_instant());
                    if let Ok(data) = frame.into_data()
                        && let Err(e) = this.meter.observe(data, &mut this.out)
                    {
                        this.abort("upstream_garbage", e);
                    }
                    if this.out.iter().map(Bytes::len).sum::<usize>() >= COALESCE_BYTES {
                        break;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream broke");
                    this.abort("upstream_reset", Box::new(e));
                }
                Poll::Ready(None) => {
                    this.upstream = None;
                    this.out.extend(this.meter.finish());
                    this.settle("complete");
                }
                Poll::Pending if this.out.is_empty() => {
                    if this.idle_expired(cx) {
                        tracing::warn!("upstream stream idle too long; ending it");
                        this.abort("upstream_idle", "upstream stream idle timeout".into());
                        continue;
                    }
                    return Poll::Pending;
                }
                // Everything the upstream socket held has been read (a burst of
                // events arrives in one read): it leaves in one write.
                Poll::Pending => break,
            }
        }
        if !this.out.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(this.take_out()))));
        }
        if let Some(e) = this.failure.take() {
            return Poll::Ready(Some(Err(e)));
        }
        debug_assert!(
            this.upstream.is_none(),
            "the loop leaves an open upstream only with events queued"
        );
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.upstream.is_none() && self.out.is_empty() && self.failure.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        let Some(settlement) = self.settlement.take() else {
            return;
        };
        // The client went away before the stream ended.
        let upstream = self.upstream.take();
        let handle = tokio::runtime::Handle::try_current();
        match (self.on_disconnect, upstream, handle) {
            (OnDisconnect::Drain, Some(upstream), Ok(handle)) => {
                let meter = std::mem::replace(&mut self.meter, Meter::new(false, 0));
                handle.spawn(drain(upstream, meter, self.idle_timeout, settlement));
            }
            // Dropping the upstream body closes its connection: the backend
            // sees the cancellation and stops generating.
            _ => settlement.settle(self.meter.usage(), "client_gone"),
        }
    }
}

/// Reads the rest of an abandoned stream to learn its exact usage.
async fn drain(
    mut upstream: UpstreamBody,
    mut meter: Meter,
    idle: Duration,
    settlement: Settlement,
) {
    let mut unsent = VecDeque::new();
    loop {
        match tokio::time::timeout(idle, upstream.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && meter.observe(data, &mut unsent).is_err()
                {
                    break;
                }
                unsent.clear();
            }
            Ok(None) => {
                meter.finish();
                break;
            }
            Ok(Some(Err(_))) | Err(_) => break,
        }
    }
    settlement.settle(meter.usage(), "client_gone_drained");
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str =
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(meter: &mut Meter, parts: &[&str]) -> String {
        let mut out = VecDeque::new();
        for p in parts {
            meter
                .observe(Bytes::copy_from_slice(p.as_bytes()), &mut out)
                .unwrap();
        }
        out.extend(meter.finish());
        out.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn hides_the_usage_chunk_it_asked_for_and_keeps_its_numbers() {
        let mut m = Meter::new(true, 99);
        let out = run(&mut m, &[CONTENT, USAGE, DONE]);
        assert_eq!(out, format!("{CONTENT}{DONE}"));
        assert_eq!(
            m.usage(),
            Usage {
                prompt_tokens: 12,
                completion_tokens: 34,
                reported: true
            }
        );
    }

    #[test]
    fn forwards_the_usage_chunk_the_client_asked_for() {
        let mut m = Meter::new(false, 99);
        let out = run(&mut m, &[CONTENT, USAGE, DONE]);
        assert_eq!(out, format!("{CONTENT}{USAGE}{DONE}"));
    }

    #[test]
    fn counts_when_no_usage_arrives_even_across_split_events() {
        let mut m = Meter::new(true, 7);
        let whole = format!("{CONTENT}{CONTENT}: ping\n\n{DONE}");
        let (a, b) = whole.split_at(30);
        let out = run(&mut m, &[a, b]);
        assert_eq!(out, whole, "bytes pass unchanged");
        // "HelloHello" = 10 bytes = 3 tokens; the prompt is kedge's estimate.
        assert_eq!(
            m.usage(),
            Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
                reported: false
            }
        );
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut m = Meter::new(true, 0);
        let blob = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(m.observe(Bytes::from(blob), &mut VecDeque::new()).is_err());
    }
}
