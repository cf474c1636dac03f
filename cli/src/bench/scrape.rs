//! `bench data-path --scrape-interval-ms`: scrapes every broker's `/metrics` while the
//! workloads run, as a Prometheus would (the same `Accept` header, a new connection
//! per scrape), from a thread of its own so that the benchmark's client is not slowed
//! by it. The run reports how many scrapes were made, and how big and slow they were.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What Prometheus 2.x and 3.x send.
const ACCEPT: &str = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
/// Longest a connect, a write or a read of one scrape may take (Prometheus' default
/// scrape timeout is 10 s).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the scraping thread checks whether it should stop while it waits.
const STOP_POLL: Duration = Duration::from_millis(20);

/// What the scraping thread saw.
#[derive(Default)]
struct Tally {
    scrapes: u64,
    failed: u64,
    first_failure: Option<String>,
    bytes: u64,
    time: Duration,
}

/// A running scrape loop; [`Scraper::finish`] stops it and prints its JSON line.
/// Dropping it stops it too (on a benchmark's error path).
pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Tally>>,
    interval: Duration,
    targets: usize,
}

impl Scraper {
    /// Scrapes `http://<target>/metrics` for each of `targets` every `interval`.
    pub fn start(targets: Vec<String>, interval: Duration) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let count = targets.len();
        let thread = std::thread::spawn(move || {
            let mut tally = Tally::default();
            // Bounded by the run: `finish` (or drop) sets `stop` once the workloads end.
            while !stopping.load(Ordering::Relaxed) {
                let round = Instant::now();
                for target in &targets {
                    let t = Instant::now();
                    match scrape(target) {
                        Ok(bytes) => tally.bytes += bytes,
                        Err(e) => {
                            tally.failed += 1;
                            tally.first_failure.get_or_insert_with(|| format!("{target}: {e}"));
                        }
                    }
                    tally.scrapes += 1;
                    tally.time += t.elapsed();
                }
                while !stopping.load(Ordering::Relaxed) && round.elapsed() < interval {
                    std::thread::sleep(STOP_POLL.min(interval.saturating_sub(round.elapsed())));
                }
            }
            tally
        });
        Scraper { stop, thread: Some(thread), interval, targets: count }
    }

    /// Stops scraping and prints what was scraped.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let Some(tally) = self.thread.take().and_then(|t| t.join().ok()) else { return };
        let ok = tally.scrapes - tally.failed;
        println!(
            "{}",
            serde_json::json!({
                "bench": "scrapes of /metrics during the run",
                "interval_ms": self.interval.as_millis() as u64,
                "targets": self.targets,
                "scrapes": tally.scrapes,
                "failed": tally.failed,
                "first_failure": tally.first_failure,
                "bytes_per_scrape": tally.bytes.checked_div(ok).unwrap_or(0),
                "ms_per_scrape": if tally.scrapes == 0 { 0.0 } else {
                    tally.time.as_secs_f64() * 1e3 / tally.scrapes as f64
                },
            })
        );
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `GET /metrics` of `target` (`host:port`); the bytes of the answer.
fn scrape(target: &str) -> Result<u64, String> {
    let addr: std::net::SocketAddr = target.parse().map_err(|e| format!("not an address: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(SCRAPE_TIMEOUT)).map_err(|e| e.to_string())?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {target}\r\nAccept: {ACCEPT}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    let status = answer.split(|b| *b == b'\r').next().map(String::from_utf8_lossy).unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("answered {status:?}"));
    }
    Ok(answer.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_of_nothing_listening_is_counted_as_failed() {
        // A port nobody listens on: connecting is refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = scrape(&addr).unwrap_err();
        assert!(e.starts_with("connect: "), "{e}");
        assert!(scrape("nowhere").unwrap_err().starts_with("not an address"));
    }

    #[test]
    fn a_scrape_reads_the_whole_answer_and_checks_its_status() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            for answer in ["HTTP/1.1 200 OK\r\n\r\nup 1\n", "HTTP/1.1 404 Not Found\r\n\r\n"] {
                let (mut c, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                // The whole request head, however many reads it takes.
                while !request.ends_with(b"\r\n\r\n") {
                    let n = c.read(&mut buf).unwrap();
                    assert!(n > 0, "the request ended early: {:?}", String::from_utf8_lossy(&request));
                    request.extend_from_slice(&buf[..n]);
                }
                assert!(String::from_utf8_lossy(&request).contains("Accept: application/openmetrics-text"));
                c.write_all(answer.as_bytes()).unwrap();
            }
        });
        assert_eq!(scrape(&addr), Ok(24));
        assert_eq!(scrape(&addr), Err("answered \"HTTP/1.1 404 Not Found\"".into()));
        server.join().unwrap();
    }
}
