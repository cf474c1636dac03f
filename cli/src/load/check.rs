//! `load check`: the arithmetic over a publisher's and a consumer's reports (JSON
//! lines of `load publish` and `load consume`; other lines are skipped).

use std::collections::{HashMap, HashSet};
use std::io::BufRead;

/// Which part of the publisher's report counts: confirmations and errors from
/// `from_ms` to `to_ms` (Unix ms, both included; `None`: from its start, to its end).
/// Deliveries count whenever they came.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

impl Window {
    fn holds(&self, t: i64) -> bool {
        self.from_ms.is_none_or(|f| t >= f) && self.to_ms.is_none_or(|e| t <= e)
    }
}

/// Lost ids shown at most.
const LOST_IDS_SHOWN_MAX: usize = 10;

#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    /// Messages confirmed in the window (distinct run and id).
    pub confirmed: u64,
    /// Of those, delivered at least once.
    pub delivered: u64,
    /// Of those, never delivered: `confirmed - delivered`.
    pub lost: u64,
    /// Deliveries of those beyond each one's first (redeliveries and copies).
    pub duplicates: u64,
    /// Of those, delivered from more than one place (segment, offset): stored twice.
    pub stored_twice: u64,
    /// Errors the publisher saw in the window (each failed attempt, retried or not).
    pub client_errors: u64,
    /// Messages the publisher gave up on in the window (not confirmed, so not lost).
    pub gave_up: u64,
    /// Requests sent again at once because they were never sent (their connection
    /// closed first; gRPC's "transparent retry"): not errors the client saw.
    pub resent: u64,
    /// Errors the consumer saw in the window.
    pub consumer_errors: u64,
    /// The longest time without a confirmation, window edges included.
    pub longest_gap_ms: i64,
    /// When that gap began.
    pub gap_from_ms: i64,
    /// The first lost messages, as `run/id`.
    pub lost_ids: Vec<String>,
}

impl Summary {
    /// One line of `key=value` pairs.
    pub fn line(&self) -> String {
        let mut s = format!(
            "confirmed={} delivered={} lost={} duplicates={} stored_twice={} client_errors={} gave_up={} \
             consumer_errors={} longest_gap_ms={} gap_from_ms={} resent={}",
            self.confirmed,
            self.delivered,
            self.lost,
            self.duplicates,
            self.stored_twice,
            self.client_errors,
            self.gave_up,
            self.consumer_errors,
            self.longest_gap_ms,
            self.gap_from_ms,
            self.resent
        );
        if !self.lost_ids.is_empty() {
            s.push_str(&format!(" lost_ids={}", self.lost_ids.join(",")));
        }
        s
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "confirmed": self.confirmed, "delivered": self.delivered, "lost": self.lost,
            "duplicates": self.duplicates, "stored_twice": self.stored_twice,
            "client_errors": self.client_errors, "gave_up": self.gave_up,
            "consumer_errors": self.consumer_errors, "longest_gap_ms": self.longest_gap_ms,
            "gap_from_ms": self.gap_from_ms, "resent": self.resent, "lost_ids": self.lost_ids,
        })
    }
}

/// The report lines of `r` that are JSON objects with an `ev` field.
fn events(r: impl BufRead, what: &str) -> Result<Vec<serde_json::Value>, String> {
    let mut out = Vec::new();
    for line in r.lines() {
        let line = line.map_err(|e| format!("reading {what}: {e}"))?;
        if !line.starts_with('{') {
            continue;
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v.get("ev").and_then(|e| e.as_str()).is_some() {
                out.push(v);
            }
        }
    }
    Ok(out)
}

fn ev(v: &serde_json::Value) -> &str {
    v["ev"].as_str().unwrap_or_default()
}
fn t_ms(v: &serde_json::Value) -> i64 {
    v["t_ms"].as_i64().unwrap_or(0)
}
fn key(v: &serde_json::Value) -> Option<String> {
    Some(format!("{}/{}", v["run"].as_str()?, v["id"].as_u64()?))
}

pub fn check(published: impl BufRead, delivered: impl BufRead, window: Window) -> Result<Summary, String> {
    let published = events(published, "the publisher's report")?;
    let delivered = events(delivered, "the consumer's report")?;
    if !published.iter().any(|v| ev(v) == "start") {
        return Err("the publisher's report has no start line (is it a `load publish` report?)".into());
    }
    if !delivered.iter().any(|v| ev(v) == "start") {
        return Err("the consumer's report has no start line (is it a `load consume` report?)".into());
    }
    let mut s = Summary::default();
    let mut confirmed: Vec<(i64, String)> = Vec::new();
    let mut seen = HashSet::new();
    for v in &published {
        let t = t_ms(v);
        if !window.holds(t) {
            continue;
        }
        match ev(v) {
            "confirmed" => {
                if let Some(k) = key(v) {
                    if seen.insert(k.clone()) {
                        confirmed.push((t, k));
                    }
                }
            }
            "error" => s.client_errors += 1,
            "gave_up" => s.gave_up += 1,
            "resent" => s.resent += 1,
            _ => {}
        }
    }
    s.consumer_errors = delivered.iter().filter(|v| ev(v) == "error" && window.holds(t_ms(v))).count() as u64;
    // Where each confirmed message was delivered from, once per delivery.
    let mut deliveries: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    let keys: Vec<Option<String>> =
        delivered.iter().map(|v| (ev(v) == "delivered").then(|| key(v)).flatten()).collect();
    for (v, k) in delivered.iter().zip(&keys) {
        if let Some(k) = k {
            if seen.contains(k) {
                let place = (v["segment_id"].as_u64().unwrap_or(0), v["offset"].as_u64().unwrap_or(0));
                deliveries.entry(k.as_str()).or_default().push(place);
            }
        }
    }
    confirmed.sort();
    s.confirmed = confirmed.len() as u64;
    for (_, k) in &confirmed {
        match deliveries.get(k.as_str()) {
            None => {
                s.lost += 1;
                if s.lost_ids.len() < LOST_IDS_SHOWN_MAX {
                    s.lost_ids.push(k.clone());
                }
            }
            Some(places) => {
                s.delivered += 1;
                s.duplicates += places.len() as u64 - 1;
                let distinct: HashSet<&(u64, u64)> = places.iter().collect();
                if distinct.len() > 1 {
                    s.stored_twice += 1;
                }
            }
        }
    }
    // Gaps: from the window's start (or the publisher's) through every confirmation to
    // the window's end (or the publisher's end, or its last line).
    let start = window.from_ms.or_else(|| published.iter().filter(|v| ev(v) == "start").map(t_ms).min());
    let end = window.to_ms.or_else(|| published.iter().map(t_ms).max());
    let times = start.into_iter().chain(confirmed.iter().map(|(t, _)| *t)).chain(end);
    let mut previous: Option<i64> = None;
    for t in times {
        if let Some(p) = previous {
            if t - p > s.longest_gap_ms {
                s.longest_gap_ms = t - p;
                s.gap_from_ms = p;
            }
        }
        previous = Some(previous.map_or(t, |p| p.max(t)));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(lines: &[&str]) -> String {
        let mut s = String::from("{\"ev\":\"start\",\"t_ms\":1000,\"run\":\"r\"}\n");
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
    fn conf(t: i64, id: u64) -> String {
        format!("{{\"ev\":\"confirmed\",\"t_ms\":{t},\"run\":\"r\",\"id\":{id}}}")
    }
    fn deliv(id: u64, segment: u64, offset: u64) -> String {
        format!("{{\"ev\":\"delivered\",\"t_ms\":5000,\"run\":\"r\",\"id\":{id},\"segment_id\":{segment},\"offset\":{offset}}}")
    }
    fn run(p: &[String], d: &[String], w: Window) -> Summary {
        let p: Vec<&str> = p.iter().map(String::as_str).collect();
        let mut ds = String::from("{\"ev\":\"start\",\"t_ms\":1000}\nnot json: stderr of the pod\n");
        for l in d {
            ds.push_str(l);
            ds.push('\n');
        }
        check(published(&p).as_bytes(), ds.as_bytes(), w).unwrap()
    }

    #[test]
    fn lost_is_confirmed_and_never_delivered() {
        let p = [conf(1100, 1), conf(1200, 2), conf(1300, 3), conf(1400, 4)];
        let d = [deliv(1, 0, 0), deliv(3, 0, 2), deliv(4, 0, 3)];
        let s = run(&p, &d, Window::default());
        assert_eq!((s.confirmed, s.delivered, s.lost), (4, 3, 1), "{s:?}");
        assert_eq!(s.lost_ids, vec!["r/2".to_string()]);
        assert!(s.line().contains("lost=1") && s.line().ends_with("lost_ids=r/2"), "{}", s.line());
    }

    #[test]
    fn duplicates_count_extra_deliveries_and_copies_stored_twice() {
        let p = [conf(1100, 1), conf(1200, 2)];
        // 1 redelivered from the same place twice; 2 delivered from two places.
        let d = [deliv(1, 0, 0), deliv(1, 0, 0), deliv(1, 0, 0), deliv(2, 0, 1), deliv(2, 1, 0)];
        let s = run(&p, &d, Window::default());
        assert_eq!((s.confirmed, s.delivered, s.lost, s.duplicates, s.stored_twice), (2, 2, 0, 3, 1), "{s:?}");
    }

    #[test]
    fn a_delivery_of_an_unconfirmed_message_is_not_counted() {
        let p = [conf(1100, 1), "{\"ev\":\"gave_up\",\"t_ms\":1200,\"run\":\"r\",\"id\":2}".into()];
        let d = [deliv(1, 0, 0), deliv(2, 0, 1)];
        let s = run(&p, &d, Window::default());
        assert_eq!((s.confirmed, s.delivered, s.lost, s.gave_up, s.duplicates), (1, 1, 0, 1, 0), "{s:?}");
    }

    #[test]
    fn a_request_sent_again_because_it_was_never_sent_is_no_client_error() {
        let resent = "{\"ev\":\"resent\",\"t_ms\":1150,\"run\":\"r\",\"id\":2,\"attempt\":1}".to_string();
        let p = [conf(1100, 1), resent, conf(1200, 2)];
        let d = [deliv(1, 0, 0), deliv(2, 0, 1)];
        let s = run(&p, &d, Window::default());
        assert_eq!((s.confirmed, s.lost, s.client_errors, s.resent), (2, 0, 0, 1), "{s:?}");
        assert!(s.line().ends_with(" resent=1"), "{}", s.line());
    }

    #[test]
    fn the_window_selects_confirmations_and_errors_and_bounds_the_gaps() {
        let err = |t: i64| format!("{{\"ev\":\"error\",\"t_ms\":{t},\"run\":\"r\",\"id\":9,\"error\":\"x\"}}");
        let p = [conf(1100, 1), err(1500), conf(2000, 2), err(2100), err(2200), conf(2300, 3), conf(4000, 4)];
        let d = [deliv(2, 0, 1), deliv(3, 0, 2)];
        let s = run(&p, &d, Window { from_ms: Some(1900), to_ms: Some(3000) });
        assert_eq!((s.confirmed, s.delivered, s.lost, s.client_errors), (2, 2, 0, 2), "{s:?}");
        // 1900 -> 2000 -> 2300 -> 3000: the last stretch is the longest.
        assert_eq!((s.longest_gap_ms, s.gap_from_ms), (700, 2300), "{s:?}");
        // Without a window: start 1000, confirmations, the last line (4000).
        let s = run(&p, &d, Window::default());
        assert_eq!((s.confirmed, s.lost, s.client_errors), (4, 2, 3), "{s:?}");
        assert_eq!((s.longest_gap_ms, s.gap_from_ms), (1700, 2300), "{s:?}");
    }

    #[test]
    fn no_confirmation_in_the_window_is_one_gap_over_all_of_it() {
        let p = [conf(1100, 1)];
        let s = run(&p, &[], Window { from_ms: Some(2000), to_ms: Some(9000) });
        assert_eq!((s.confirmed, s.lost, s.longest_gap_ms, s.gap_from_ms), (0, 0, 7000, 2000), "{s:?}");
    }

    #[test]
    fn consumer_errors_in_the_window_are_counted() {
        let p = [conf(1100, 1)];
        let d = [deliv(1, 0, 0), "{\"ev\":\"error\",\"t_ms\":1150,\"error\":\"moved\"}".into()];
        let s = run(&p, &d, Window { from_ms: Some(1000), to_ms: Some(1200) });
        assert_eq!(s.consumer_errors, 1, "{s:?}");
        let s = run(&p, &d, Window { from_ms: Some(1160), to_ms: Some(1200) });
        assert_eq!(s.consumer_errors, 0, "{s:?}");
    }

    #[test]
    fn reports_without_their_start_line_are_refused() {
        let e = check("{\"ev\":\"confirmed\"}\n".as_bytes(), "{\"ev\":\"start\"}\n".as_bytes(), Window::default());
        assert!(e.unwrap_err().contains("publisher's report has no start line"));
        let e = check("{\"ev\":\"start\"}\n".as_bytes(), "garbage\n".as_bytes(), Window::default());
        assert!(e.unwrap_err().contains("consumer's report has no start line"));
    }
}
