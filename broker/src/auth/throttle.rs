//! What a failed login costs: a delay before the answer, per source address, that
//! doubles with each failure from there (`--auth-failure-delay-ms` for the first, at
//! most `--auth-failure-delay-max-ms`), forgotten after `--auth-failure-forget-ms`
//! without a failure. At most `SOURCES_MAX` addresses are tracked (the stalest go
//! first), so a flood from many addresses cannot grow the table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Source addresses tracked at most.
pub const SOURCES_MAX: usize = 10_000;

#[derive(Debug, Clone, Copy)]
pub struct DelaySettings {
    pub first: Duration,
    pub max: Duration,
    pub forget_after: Duration,
}

/// The delay after the `failures`-th failure in a row (1-based).
pub fn delay_for(failures: u32, s: &DelaySettings) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    s.first.saturating_mul(1u32 << doublings).min(s.max)
}

pub struct FailureDelay {
    settings: DelaySettings,
    /// Per source (`None`: the address is unknown): failures in a row, and the last.
    sources: Mutex<HashMap<Option<IpAddr>, (u32, Instant)>>,
}

impl FailureDelay {
    pub fn new(settings: DelaySettings) -> Self {
        Self { settings, sources: Mutex::new(HashMap::new()) }
    }

    /// Records a failure from `from`; how long to wait before answering it.
    pub fn failed(&self, from: Option<IpAddr>) -> Duration {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let forget = self.settings.forget_after;
        if !sources.contains_key(&from) && sources.len() >= SOURCES_MAX {
            sources.retain(|_, (_, last)| now.duration_since(*last) < forget);
            if sources.len() >= SOURCES_MAX {
                if let Some(stalest) = sources.iter().min_by_key(|(_, (_, last))| *last).map(|(k, _)| *k) {
                    sources.remove(&stalest);
                }
            }
        }
        let entry = sources.entry(from).or_insert((0, now));
        if now.duration_since(entry.1) >= forget {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        delay_for(entry.0, &self.settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DelaySettings {
        DelaySettings {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            forget_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_delay_doubles_up_to_its_bound() {
        let s = settings();
        let ms: Vec<u128> = (1..=6).map(|n| delay_for(n, &s).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(delay_for(u32::MAX, &s), s.max);
    }

    #[tokio::test(start_paused = true)]
    async fn each_source_has_its_own_count_forgotten_after_a_quiet_while() {
        let d = FailureDelay::new(settings());
        let (a, b) = (Some("10.0.0.1".parse().unwrap()), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(d.failed(a).as_millis(), 100);
        assert_eq!(d.failed(a).as_millis(), 200);
        assert_eq!(d.failed(b).as_millis(), 100, "another address starts afresh");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(d.failed(a).as_millis(), 100, "forgotten");
    }
}
