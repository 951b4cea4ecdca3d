//! A request's budget reservation, held from before forwarding to the end of
//! the answer. Dropped without a commit (the client left while queued, the
//! attempt failed), it rolls back: every reservation ends exactly once.

use std::sync::Arc;

use jiff::Timestamp;

use crate::{
    budget::{self, Budget, Estimate, Refusal, Reservation, Subject},
    clock::coarse_timestamp,
    openai::ApiError,
};

pub struct Charge {
    budget: Arc<Budget>,
    reservation: Option<Reservation>,
}

impl Charge {
    pub fn reserve(
        budget: &Arc<Budget>,
        subject: Subject<'_>,
        estimate: Estimate,
    ) -> Result<Charge, Box<Refusal>> {
        let reservation = budget.reserve(subject, estimate, coarse_timestamp())?;
        Ok(Charge {
            budget: budget.clone(),
            reservation: Some(reservation),
        })
    }

    /// When the reservation was taken: the window its usage belongs to.
    pub fn started(&self) -> Timestamp {
        self.reservation
            .as_ref()
            .map_or_else(coarse_timestamp, |r| r.started())
    }

    /// Replaces the estimate with what was used (all of it, or what a cancelled
    /// stream got to).
    pub fn commit(mut self, usage: budget::Usage) {
        if let Some(r) = self.reservation.take() {
            let s = self.budget.commit(r, usage, coarse_timestamp());
            if s.excess_tokens > 0 || s.excess_micros > 0 {
                tracing::info!(
                    excess_tokens = s.excess_tokens,
                    excess_micros = s.excess_micros,
                    "usage exceeded its reservation (no max_tokens)"
                );
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            self.budget.rollback(r, coarse_timestamp());
        }
    }
}

/// A refusal only this arm suffers (its backend's pool, or money where arms
/// are priced differently): the next arm may still fit.
pub fn is_per_arm(r: &Refusal) -> bool {
    matches!(r.scope, budget::Scope::Pool(_)) || r.kind.measure() == budget::Measure::Money
}

/// 429 in OpenAI's shape, with `Retry-After` and `x-ratelimit-*`.
pub fn refused(r: &Refusal) -> ApiError {
    let code = match r.kind.measure() {
        budget::Measure::Money => "insufficient_quota",
        _ if r.retry_after.is_some_and(|w| w.as_secs() <= 60) => "rate_limit_exceeded",
        _ => "insufficient_quota",
    };
    let mut e = ApiError::new(
        hyper::StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        code,
        r.message(),
    );
    e.headers = r.render_headers();
    e
}
