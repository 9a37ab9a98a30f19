//! Per-tenant rate limits (`brise serve --rate-limit`, `--rate-limit-tokens`): token
//! buckets per tenant holding up to a minute's allowance and refilled continuously, so
//! one tenant's burst cannot take the server from the others. Tenants come from the
//! configured keys, so the maps stay as small as the key list.
//!
//! Requests are counted when they arrive. Tokens (prompt + completion) are only known
//! when an answer ends, so they are charged then: a tenant may start a request while it
//! has any tokens left, and a large answer takes the bucket below zero, which refuses
//! the tenant's next requests until the refill brings it back above zero. This is how a
//! tokens-per-minute limit can hold without guessing each answer's length up front.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Refills at `cap` a minute up to `cap`, as of `now`.
    fn refill(&mut self, cap: f64, now: Instant) {
        // saturating: a clock read before `last` (another thread's) adds nothing.
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * cap / 60.0).min(cap);
        self.last = self.last.max(now);
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
        }
    }
}

pub struct RateLimiter {
    /// Requests per minute per tenant; 0 turns the limit off.
    per_minute: u32,
    /// Prompt + completion tokens per minute per tenant; 0 turns the limit off.
    tokens_per_minute: u32,
    requests: Mutex<HashMap<String, Bucket>>,
    tokens: Mutex<HashMap<String, Bucket>>,
    /// Requests refused per tenant and limit, for /metrics.
    refused: Mutex<BTreeMap<(String, Limit), u64>>,
}

/// A refusal: which limit, its size, and how long until a request is allowed again.
#[derive(Clone, Copy, Debug)]
pub struct Refused {
    pub limit: Limit,
    pub per_minute: u32,
    pub wait: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on `tenant`'s bucket of `buckets` (full when new), refilled at `cap` a
/// minute as of `now`.
fn with_bucket<R>(
    buckets: &Mutex<HashMap<String, Bucket>>,
    tenant: &str,
    cap: f64,
    now: Instant,
    f: impl FnOnce(&mut Bucket) -> R,
) -> R {
    let mut g = lock(buckets);
    let b = g.entry(tenant.to_string()).or_insert(Bucket {
        tokens: cap,
        last: now,
    });
    b.refill(cap, now);
    f(b)
}

impl RateLimiter {
    pub fn new(per_minute: u32, tokens_per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_minute,
            tokens_per_minute,
            requests: Default::default(),
            tokens: Default::default(),
            refused: Default::default(),
        }
    }

    /// Admits one request from `tenant` at `now`, taking it from the request bucket;
    /// refuses it when the tenant has no request left or its tokens are spent. A request
    /// refused for tokens takes nothing from the request bucket.
    pub fn check(&self, tenant: &str, now: Instant) -> Result<(), Refused> {
        if self.tokens_per_minute > 0 {
            let cap = self.tokens_per_minute as f64;
            // Until the bucket is back above zero (at least a millisecond's worth).
            let wait = with_bucket(&self.tokens, tenant, cap, now, |b| {
                (b.tokens <= 0.0).then(|| Duration::from_secs_f64((-b.tokens) * 60.0 / cap + 1e-3))
            });
            if let Some(wait) = wait {
                return Err(self.refuse(tenant, Limit::Tokens, wait));
            }
        }
        if self.per_minute > 0 {
            let cap = self.per_minute as f64;
            let wait = with_bucket(&self.requests, tenant, cap, now, |b| {
                if b.tokens < 1.0 {
                    return Some(Duration::from_secs_f64((1.0 - b.tokens) * 60.0 / cap));
                }
                b.tokens -= 1.0;
                None
            });
            if let Some(wait) = wait {
                return Err(self.refuse(tenant, Limit::Requests, wait));
            }
        }
        Ok(())
    }

    /// Charges `n` tokens a request of `tenant` used (prompt and completion).
    pub fn spend(&self, tenant: &str, n: usize, now: Instant) {
        if self.tokens_per_minute == 0 || n == 0 {
            return;
        }
        let cap = self.tokens_per_minute as f64;
        with_bucket(&self.tokens, tenant, cap, now, |b| b.tokens -= n as f64);
    }

    fn refuse(&self, tenant: &str, limit: Limit, wait: Duration) -> Refused {
        *lock(&self.refused)
            .entry((tenant.to_string(), limit))
            .or_default() += 1;
        Refused {
            limit,
            per_minute: match limit {
                Limit::Requests => self.per_minute,
                Limit::Tokens => self.tokens_per_minute,
            },
            wait,
        }
    }

    /// Requests refused so far, per tenant and limit.
    pub fn refused(&self) -> Vec<(String, Limit, u64)> {
        lock(&self.refused)
            .iter()
            .map(|((t, l), n)| (t.clone(), *l, *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_holds_a_minute_and_refills_per_tenant() {
        let l = RateLimiter::new(3, 0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check("a", t0).is_ok());
        }
        // 3/min: one request every 20 s.
        let wait = l.check("a", t0).unwrap_err().wait;
        assert!((19.9..=20.1).contains(&wait.as_secs_f64()), "{wait:?}");
        // Another tenant has its own bucket.
        assert!(l.check("b", t0).is_ok());
        assert!(l.check("a", t0 + Duration::from_secs(10)).is_err());
        assert!(l.check("a", t0 + Duration::from_secs(21)).is_ok());
        assert!(l.check("a", t0 + Duration::from_secs(21)).is_err());
        // Idle for long: the bucket is full again, never fuller.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.check("a", later).is_ok());
        }
        assert!(l.check("a", later).is_err());
        assert_eq!(l.refused(), vec![("a".to_string(), Limit::Requests, 4)]);
        // 0: off.
        let off = RateLimiter::new(0, 0);
        for _ in 0..1000 {
            assert!(off.check("a", t0).is_ok());
            off.spend("a", 1_000_000, t0);
        }
    }

    #[test]
    fn tokens_are_charged_after_the_answer_and_a_deficit_refuses_until_refilled() {
        // 600 tokens a minute: 10 a second.
        let l = RateLimiter::new(0, 600);
        let t0 = Instant::now();
        assert!(l.check("a", t0).is_ok());
        l.spend("a", 500, t0);
        // 100 left: admitted, however long its answer will be.
        assert!(l.check("a", t0).is_ok());
        l.spend("a", 400, t0);
        // 300 below zero: refused for 30 s, and counted as a tokens refusal.
        let r = l.check("a", t0).unwrap_err();
        assert_eq!((r.limit, r.per_minute), (Limit::Tokens, 600));
        assert!((30.0..=30.01).contains(&r.wait.as_secs_f64()), "{r:?}");
        assert!(l.check("a", t0 + Duration::from_secs(29)).is_err());
        assert!(l.check("a", t0 + Duration::from_secs(31)).is_ok());
        // Another tenant is not affected.
        assert!(l.check("b", t0).is_ok());
        assert_eq!(l.refused(), vec![("a".to_string(), Limit::Tokens, 2)]);
    }

    #[test]
    fn a_token_refusal_takes_no_request() {
        let l = RateLimiter::new(2, 60);
        let t0 = Instant::now();
        assert!(l.check("a", t0).is_ok());
        l.spend("a", 120, t0);
        for _ in 0..5 {
            assert_eq!(l.check("a", t0).unwrap_err().limit, Limit::Tokens);
        }
        // 60 s later the tokens are back above zero and one request is still left.
        let t1 = t0 + Duration::from_secs(61);
        assert!(l.check("a", t1).is_ok());
        assert!(l.check("a", t1).is_ok());
        assert_eq!(l.check("a", t1).unwrap_err().limit, Limit::Requests);
    }
}
