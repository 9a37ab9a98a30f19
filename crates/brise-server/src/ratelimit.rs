//! Per-tenant request rate limits (`brise serve --rate-limit`): a token bucket per
//! tenant holding up to a minute's requests and refilled continuously, so one tenant's
//! burst cannot take the server from the others. Tenants come from the configured keys,
//! so the map stays as small as the key list.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct RateLimiter {
    /// Requests per minute per tenant; 0 turns the limit off.
    per_minute: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Requests refused per tenant, for /metrics.
    refused: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_minute,
            buckets: Default::default(),
            refused: Default::default(),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes one request from `tenant`'s bucket at `now`; `Err` holds how long until
    /// one is available again.
    pub fn check(&self, tenant: &str, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let cap = self.per_minute as f64;
        let rate = cap / 60.0;
        let mut g = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = g.entry(tenant.to_string()).or_insert(Bucket {
            tokens: cap,
            last: now,
        });
        // saturating: a clock read before `last` (another thread's) adds nothing.
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * rate).min(cap);
        b.last = b.last.max(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - b.tokens) / rate);
        drop(g);
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry(tenant.to_string()).or_default() += 1;
        Err(wait)
    }

    /// Requests refused so far, per tenant.
    pub fn refused(&self) -> Vec<(String, u64)> {
        let r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().map(|(t, n)| (t.clone(), *n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_holds_a_minute_and_refills_per_tenant() {
        let l = RateLimiter::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check("a", t0).is_ok());
        }
        // 3/min: one request every 20 s.
        let wait = l.check("a", t0).unwrap_err();
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
        assert_eq!(l.refused(), vec![("a".to_string(), 4)]);
        // 0: off.
        let off = RateLimiter::new(0);
        for _ in 0..1000 {
            assert!(off.check("a", t0).is_ok());
        }
    }
}
