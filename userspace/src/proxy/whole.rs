//! Reading a whole body, bounded: a request's, and a non-streamed answer's.
//!
//! In place of `Limited::new(body, max).collect()`: a body that arrives as one
//! chunk (nearly every request and answer of an LLM API) is kept as that
//! chunk, with no queue of chunks to allocate and no copy; only a body in
//! several chunks is gathered into one buffer.

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

/// Why a body could not be read whole.
#[derive(Debug)]
pub enum WholeError<E> {
    /// It is longer than the bound.
    TooLarge,
    /// The body itself failed (the peer broke off, a framing error).
    Broken(E),
}

/// The body's data, all of it, failing once it passes `max` bytes. Trailers
/// are dropped, as `collect().to_bytes()` drops them.
pub async fn read_whole<B>(mut body: B, max: usize) -> Result<Bytes, WholeError<B::Error>>
where
    B: Body<Data = Bytes> + Unpin,
{
    // The first chunk as it came; `more` once a second one arrives.
    let mut first = Bytes::new();
    let mut more: Option<BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(WholeError::Broken)?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        len = len.saturating_add(data.len());
        if len > max {
            return Err(WholeError::TooLarge);
        }
        match &mut more {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let hint = body.size_hint().lower() as usize;
                let mut buf = BytesMut::with_capacity(len.saturating_add(hint).min(max));
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                more = Some(buf);
            }
        }
    }
    Ok(more.map_or(first, BytesMut::freeze))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        pin::Pin,
        task::{Context, Poll},
    };

    use http_body::Frame;

    use super::*;

    /// A body that yields the given frames, one per poll.
    struct Frames(VecDeque<Result<Frame<Bytes>, &'static str>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn data(parts: &[&'static str]) -> Frames {
        Frames(
            parts
                .iter()
                .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
                .collect(),
        )
    }

    fn read(body: Frames, max: usize) -> Result<Bytes, WholeError<&'static str>> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(read_whole(body, max))
    }

    #[test]
    fn one_chunk_is_kept_as_it_is() {
        let chunk = Bytes::from_static(b"{\"model\":\"m\"}");
        let body = Frames([Ok(Frame::data(chunk.clone()))].into());
        let got = read(body, 1024).unwrap();
        assert_eq!(got, chunk);
        // The same bytes, not a copy of them.
        assert_eq!(got.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn chunks_are_joined_in_order_and_empty_ones_and_trailers_skipped() {
        let mut body = data(&["ab", "", "cde", "f"]);
        body.0.push_back(Ok(Frame::trailers(Default::default())));
        assert_eq!(read(body, 6).unwrap(), "abcdef");
        assert_eq!(read(data(&[]), 0).unwrap(), "");
    }

    #[test]
    fn a_body_past_the_bound_is_too_large_in_one_chunk_or_many() {
        assert!(matches!(
            read(data(&["abcdefg"]), 6),
            Err(WholeError::TooLarge)
        ));
        assert!(matches!(
            read(data(&["abc", "defg"]), 6),
            Err(WholeError::TooLarge)
        ));
        assert!(matches!(read(data(&["abc", "def"]), 6), Ok(b) if b == "abcdef"));
    }

    #[test]
    fn a_broken_body_is_its_error() {
        let mut body = data(&["abc"]);
        body.0.push_back(Err("reset"));
        assert!(matches!(read(body, 100), Err(WholeError::Broken("reset"))));
    }
}
