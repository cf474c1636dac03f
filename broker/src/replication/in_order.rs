//! One publisher's batches stored in the order they were handed in, several in flight
//! at once, wherever the primary is (an AMQP channel's publishes).
//!
//! Each batch is routed only once the batch before it let it ([`Progress`]): a batch
//! stored through this node's primary lets the next go once it is queued there (its
//! [`Turn`]); a batch whose shard's primary is another node goes there on this
//! publisher's relay, one `PublishStream` to that node (the one a gRPC stream is
//! relayed on), and lets the next batch go as soon as it is on the stream, if that
//! batch goes on the same stream: the node at the other end stores a stream's requests
//! in turn, so the stream keeps their order while several wait for their confirmation
//! at once. A batch that goes anywhere else waits until the one before it was answered.
//! Without the relay, a batch forwarded to another node held its turn until it was
//! answered, so such a publisher had one request in flight at a time.
//!
//! A batch on a stream that broke before its answer (the node went away, the stream
//! ended at an earlier batch's refusal, no answer within twice the request timeout) is
//! routed again in its turn within its request timeout: its outcome is unknown, so it
//! may be stored twice (at least once, as a retried forwarded publish is).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use eventtermq_proto::v1::{Message, Persistence, PublishRequest, PublishResponse};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::publish::{again, StreamTarget, Turn, RETRY_PAUSE};
use super::{lock, Segments};
use crate::error::{ErrorCode, RequestError};

/// How far a batch is: what the batch after it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Not routed yet (or routed again after its stream broke).
    Waiting,
    /// Sent on relay stream `id`: the next batch may follow it on that stream.
    OnStream(u64),
    /// Queued at a primary here, or answered: the next batch may go anywhere.
    Placed,
}

/// What the far end of a relay stream said about one batch.
enum Answer {
    Stored(PublishResponse),
    Refused(RequestError),
    /// The stream ended or broke before this batch's answer: outcome unknown.
    Lost,
}

static RELAY_IDS: AtomicU64 = AtomicU64::new(1);

/// One publisher's ordered batches (see the module). Dropping it ends its relay
/// stream once the batches on it are answered.
pub struct InOrder {
    segments: Segments,
    relay: Arc<Mutex<Option<Relay>>>,
    /// How far the batch handed in last is.
    previous: Option<watch::Receiver<Progress>>,
}

/// A `PublishStream` to the node holding the primary of a topic's shard, and who
/// waits for its answers (in the order the requests were sent).
struct Relay {
    id: u64,
    namespace: String,
    topic: String,
    addr: String,
    requests: mpsc::UnboundedSender<PublishRequest>,
    waiters: mpsc::UnboundedSender<oneshot::Sender<Answer>>,
}

impl Relay {
    fn serves(&self, namespace: &str, topic: &str, addr: &str) -> bool {
        self.namespace == namespace && self.topic == topic && self.addr == addr
    }

    /// Sends `request` on the stream; `None` when the stream is gone (nothing sent).
    fn send(&self, request: PublishRequest) -> Option<oneshot::Receiver<Answer>> {
        let (tx, rx) = oneshot::channel();
        // The waiter first: the reader refuses new waiters before it gives any answer
        // that ends the stream, so a batch never follows a broken stream's last one.
        self.waiters.send(tx).ok()?;
        // Sent or not, the reader answers the waiter (`Lost` once the stream is gone).
        let _ = self.requests.send(request);
        Some(rx)
    }
}

impl InOrder {
    pub fn new(segments: Segments) -> Self {
        InOrder { segments, relay: Arc::default(), previous: None }
    }

    /// Stores `messages` (contiguously, after every batch handed in before) as a
    /// `Publish` of them would; the future answers once they are as durable as
    /// `persistence` asks. The futures must be polled together (e.g. in a
    /// `FuturesOrdered`): each waits for the one before it to be routed.
    pub fn publish(
        &mut self,
        namespace: String,
        topic: String,
        messages: Vec<Message>,
        persistence: Persistence,
    ) -> impl Future<Output = Result<PublishResponse, RequestError>> + Send + 'static {
        let (progress, next) = watch::channel(Progress::Waiting);
        let previous = self.previous.replace(next);
        let batch = Batch {
            segments: self.segments.clone(),
            relay: self.relay.clone(),
            namespace,
            topic,
            messages,
            persistence,
        };
        batch.run(previous, progress)
    }
}

struct Batch {
    segments: Segments,
    relay: Arc<Mutex<Option<Relay>>>,
    namespace: String,
    topic: String,
    messages: Vec<Message>,
    persistence: Persistence,
}

impl Batch {
    async fn run(
        self,
        mut previous: Option<watch::Receiver<Progress>>,
        progress: watch::Sender<Progress>,
    ) -> Result<PublishResponse, RequestError> {
        let routing_key = self.messages.first().map(|m| m.routing_key.clone());
        let mut deadline: Option<Instant> = None;
        // An attempt that may have stored the messages: a later refusal must not say
        // "nothing changed".
        let mut unknown: Option<RequestError> = None;
        loop {
            let sent = loop {
                let before = match &mut previous {
                    None => Progress::Placed,
                    Some(rx) => match rx.has_changed() {
                        Err(_) => Progress::Placed, // that batch is done
                        Ok(_) => *rx.borrow_and_update(),
                    },
                };
                let target = self.segments.stream_target(&self.namespace, &self.topic, routing_key.as_deref(), 0);
                match (before, target) {
                    (Progress::Placed, StreamTarget::Here { .. }) => break None,
                    (Progress::Placed, StreamTarget::Relay(addr)) => break Some(self.send(&addr)),
                    (Progress::OnStream(id), StreamTarget::Relay(addr)) => {
                        if let Some(sent) = self.follow(&addr, id) {
                            break Some(sent);
                        }
                    }
                    _ => {}
                }
                // Wait for the batch before to move on.
                if let Some(rx) = &mut previous {
                    if rx.changed().await.is_err() {
                        previous = None;
                    }
                }
            };
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.segments.cluster().request_timeout());
            let Some((id, answer)) = sent else {
                // Here: through `publish_in_turn`, the next batch going once this one
                // is queued at its primary (or forwarded and answered).
                let (turn, turned): (Turn, _) = oneshot::channel();
                let publish = self.segments.publish_in_turn(
                    &self.namespace,
                    &self.topic,
                    &self.messages,
                    self.persistence,
                    None,
                    0,
                    Some(turn),
                );
                let placed = async {
                    let _ = turned.await;
                    progress.send_replace(Progress::Placed);
                };
                let (r, ()) = tokio::join!(publish, placed);
                return r.map_err(|e| e.after_unknown(unknown.as_ref()));
            };
            progress.send_replace(Progress::OnStream(id));
            let answer = answer.await.unwrap_or(Answer::Lost);
            let e = match answer {
                Answer::Stored(r) => return Ok(r),
                Answer::Refused(e) if !again(&e) || Instant::now() >= deadline => {
                    return Err(e.after_unknown(unknown.as_ref()))
                }
                Answer::Refused(e) => {
                    // As a forwarded publish: the node may be gone, the state may
                    // name the next primary in a moment.
                    tokio::time::sleep(RETRY_PAUSE).await;
                    e
                }
                Answer::Lost => RequestError::new(
                    ErrorCode::Timeout,
                    format!(
                        "topic {:?}: the stream to its primary ended before this publish was answered; \
                         it may be stored",
                        self.topic
                    ),
                ),
            };
            if Instant::now() >= deadline {
                return Err(e.after_unknown(unknown.as_ref()));
            }
            if e.code.outcome_unknown() {
                unknown = Some(e);
            }
            // Routed again, in turn: the batch after this one waits (it is on the same
            // broken stream, or routes only after this one is placed).
            progress.send_replace(Progress::Waiting);
        }
    }

    fn request(&self) -> PublishRequest {
        PublishRequest {
            namespace: self.namespace.clone(),
            topic: self.topic.clone(),
            messages: self.messages.clone(),
            persistence: self.persistence as i32,
            producer_id: 0,
            sequence: 0,
        }
    }

    /// Sends this batch on the relay to `addr` (every batch before it is placed): the
    /// current one when it serves this topic there and is still up, else a new one.
    fn send(&self, addr: &str) -> (u64, oneshot::Receiver<Answer>) {
        let mut relay = lock(&self.relay);
        if let Some(r) = relay.as_ref().filter(|r| r.serves(&self.namespace, &self.topic, addr)) {
            if let Some(answer) = r.send(self.request()) {
                return (r.id, answer);
            }
        }
        let (fresh, answer) = self.open(addr);
        let id = fresh.id;
        // The one it replaces (if any) ends once the batches on it are answered.
        *relay = Some(fresh);
        (id, answer)
    }

    /// Sends this batch right after the one before it, which is on relay `id`: only
    /// on that relay, if it still goes to `addr` for this topic and is up; `None`:
    /// not sent (wait for the batch before to be placed).
    fn follow(&self, addr: &str, id: u64) -> Option<(u64, oneshot::Receiver<Answer>)> {
        let relay = lock(&self.relay);
        let r = relay.as_ref().filter(|r| r.id == id && r.serves(&self.namespace, &self.topic, addr))?;
        Some((r.id, r.send(self.request())?))
    }

    /// A new relay stream to `addr` for this batch's topic, with this batch sent on it.
    fn open(&self, addr: &str) -> (Relay, oneshot::Receiver<Answer>) {
        let (requests, upstream) = mpsc::unbounded_channel();
        let (waiters, waiting) = mpsc::unbounded_channel();
        let (waiter, answer) = oneshot::channel();
        // Before the stream opens: the far end answers its headers only once it has
        // the first request.
        let _ = waiters.send(waiter);
        let _ = requests.send(self.request());
        let relay = Relay {
            id: RELAY_IDS.fetch_add(1, Ordering::Relaxed),
            namespace: self.namespace.clone(),
            topic: self.topic.clone(),
            addr: addr.to_string(),
            requests,
            waiters,
        };
        let read = read_answers(self.segments.clone(), addr.to_string(), upstream, waiting);
        // Who the publisher works for goes with the stream, so the primary's node
        // checks it as it would a forwarded publish.
        self.segments.spawn(crate::peers::CALLER.scope(crate::peers::current_caller(), read));
        (relay, answer)
    }
}

/// Opens the stream and hands its answers to the waiters in order; ends once the
/// relay is dropped and every waiter answered. At the first refusal (the far end stops
/// there), a stream that ends or breaks, or no answer within twice the request
/// timeout, it takes no more waiters (their batches route again) and the waiting ones
/// hear `Lost`.
async fn read_answers(
    segments: Segments,
    addr: String,
    upstream: mpsc::UnboundedReceiver<PublishRequest>,
    mut waiting: mpsc::UnboundedReceiver<oneshot::Sender<Answer>>,
) {
    let patience = segments.cluster().request_timeout() * 2;
    let opened = segments.peers().relay_publish_stream(&addr, UnboundedReceiverStream::new(upstream), 0).await;
    waiting_answered(&addr, patience, opened.map_err(RequestError::from), &mut waiting).await;
    waiting.close();
    while let Some(w) = waiting.recv().await {
        let _ = w.send(Answer::Lost);
    }
}

/// Answers the waiters from the stream until the relay is dropped (`waiting` ends) or
/// the stream fails one; then closes `waiting` before answering that one.
async fn waiting_answered(
    addr: &str,
    patience: std::time::Duration,
    opened: Result<crate::peers::Relayed<PublishResponse>, RequestError>,
    waiting: &mut mpsc::UnboundedReceiver<oneshot::Sender<Answer>>,
) {
    let mut answers = match opened {
        Ok(a) => a,
        Err(e) => {
            // The first batch hears why; the rest `Lost`.
            waiting.close();
            if let Some(first) = waiting.recv().await {
                let _ = first.send(Answer::Refused(e));
            }
            return;
        }
    };
    // `None`: the relay was dropped and every batch on it answered.
    while let Some(waiter) = waiting.recv().await {
        let answer = match tokio::time::timeout(patience, answers.next()).await {
            Ok(Some(Ok(r))) => {
                let _ = waiter.send(Answer::Stored(r));
                continue;
            }
            Ok(Some(Err(e))) => Answer::Refused(e),
            Ok(None) => Answer::Lost,
            Err(_) => Answer::Refused(RequestError::new(
                ErrorCode::Timeout,
                format!(
                    "no answer from the primary's node at {addr} within {} ms (twice --request-timeout-ms); \
                     the publish may be stored",
                    patience.as_millis()
                ),
            )),
        };
        waiting.close();
        let _ = waiter.send(answer);
        return;
    }
}
