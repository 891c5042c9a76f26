//! The boundary in front of the broker's state: every kind of client goes
//! through a [`Link`] (TCP connections, the application's in-process
//! clients, the `$SYS` publisher; bridges and cluster peers next), and the
//! authentication, authorization and event hooks run here and nowhere
//! else, so no caller can bypass them.
//!
//! - [`Core::attach`] authenticates a client, checks its will, takes the
//!   session over from another connection if needed, and returns its link;
//! - a [`Link`] publishes, subscribes, unsubscribes, acknowledges and
//!   detaches, in the client's order;
//! - its [`Outbox`] hands out the session's deliveries in session order
//!   (see [`crate::session`]), after the delivery authorization.
//!
//! What a link does not know: packets, sockets, protocol versions beyond
//! what the hooks are told. The connection module translates packets to
//! these calls and back.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::paging;
use crate::broker::{
    Core, Granted, Origin, SessionExpiry, Stats, SubscribeRefusal, Unsubscribed, Will,
};
use crate::events::Event;
use crate::hooks::{
    ClientInfo, ConnectInfo, Decision, HookError, Login, ProtocolVersion, SubscribeDecision,
};
use crate::message::{now_ms, Message, QoS};
use crate::metrics;
use crate::session::{Attachment, Outgoing, Session};
use crate::storage::{ClientId, PacketOp, StorageError, StorageResult};
use crate::subscription::SubscriptionOptions;
use crate::topic;

/// Topics a link remembers as allowed when the hook asks for a cache.
const PUBLISH_CACHE_SIZE: usize = 32;

/// What a client asks for when it attaches.
#[derive(Debug)]
pub(crate) struct AttachRequest {
    /// Empty: the broker assigns one.
    pub(crate) client_id: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Bytes>,
    pub(crate) clean_start: bool,
    pub(crate) expiry: SessionExpiry,
    pub(crate) will: Option<Will>,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) listener: Arc<str>,
    /// The listener admits clients no authentication vouches for.
    pub(crate) allow_anonymous: bool,
    /// `username` is the name of the client's verified TLS certificate.
    pub(crate) certificate_identity: bool,
    pub(crate) protocol: ProtocolVersion,
    /// MQTT 5 enhanced authentication already let the client in: the
    /// authentication hook is not asked again.
    pub(crate) authenticated: bool,
    /// Another broker's bridge (3.1.1 with the bridge bit): it may publish
    /// its connection state under `$SYS/broker/connection/`.
    pub(crate) bridge: bool,
}

/// Why a client could not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The authentication hook said the credentials are wrong.
    #[error("bad user name or password")]
    BadCredentials,
    /// The authentication hook refused the client.
    #[error("not authorized")]
    NotAuthorized,
    /// The authorization hook refused the client's will.
    #[error("the will message is not authorized")]
    WillNotAuthorized,
    /// Its address failed to authenticate too often lately (`auth_failure_limit`).
    #[error("too many failed authentications from this address")]
    Throttled,
    /// A hook timed out, failed or panicked; the client may retry later.
    #[error("authentication could not be decided: {0}")]
    HookFailed(String),
    /// The session could not be opened in the store.
    #[error("session storage unavailable")]
    Storage(#[from] StorageError),
}

/// A successful attach.
pub(crate) struct Attached {
    pub(crate) link: Link,
    pub(crate) session_present: bool,
    /// The client id the broker chose, when the client sent none.
    pub(crate) assigned_id: Option<ClientId>,
}

/// Why a publish was refused (it is not routed).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishRefused {
    /// The authorization hook denied it, or it targets `$SYS/`.
    #[error("not authorized")]
    NotAuthorized,
    /// More levels than `max_topic_levels`.
    #[error("topic has more than {0} levels")]
    TooDeep(usize),
    /// The retained store could not be updated.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A message accepted from a link.
pub(crate) struct Published {
    /// Some subscription matched.
    pub(crate) matched: bool,
    /// Resolves once the message is durable; the publisher's acknowledgement waits for it.
    pub(crate) committed: BoxFuture<'static, StorageResult<()>>,
}

/// An acknowledgement from the client of a delivery.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ack {
    /// PUBACK (any reason code ends a QoS 1 delivery).
    Qos1Done(u16),
    /// PUBREC accepting a QoS 2 delivery: PUBREL is owed.
    Received(u16),
    /// PUBREC with an error code: the delivery ends without PUBREL.
    Refused(u16),
    /// PUBCOMP: the QoS 2 delivery is done.
    Qos2Done(u16),
}

/// Call a hook within `hook_timeout_ms`, catching its panic; `None` when it
/// did not decide (counted and logged: the caller refuses).
async fn call_hook<T>(
    core: &Core,
    hook: &'static str,
    client: &str,
    call: impl std::future::Future<Output = Result<T, HookError>>,
) -> Option<T> {
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        core.config().hook_timeout(),
        AssertUnwindSafe(call).catch_unwind(),
    )
    .await;
    core.stats().histograms.hook_us[metrics::hook_label(hook)]
        .observe(started.elapsed().as_micros() as u64);
    let why = match outcome {
        Ok(Ok(Ok(v))) => return Some(v),
        Ok(Ok(Err(e))) => format!("failed: {e}"),
        Ok(Err(_)) => "panicked".to_string(),
        Err(_) => format!("took longer than {} ms", core.config().hook_timeout_ms),
    };
    let n = Stats::bump(&core.stats().hook_failures);
    // First and then every 1000th: a database that is down does not flood the log.
    if n == 1 || n.is_multiple_of(1000) {
        warn!(hook, %client, failures = n, "hook {why}: request refused");
    }
    None
}

impl Core {
    /// Attach a client: authenticate it, check its will, open or resume its
    /// session (taking it over from another connection), and return its link.
    pub(crate) async fn attach(
        self: &Arc<Core>,
        req: AttachRequest,
    ) -> Result<Attached, AttachError> {
        let assigned = req.client_id.is_empty();
        let client_id: ClientId = if assigned {
            format!("auto-{:016x}", self.fresh_id()).into()
        } else {
            req.client_id.as_str().into()
        };
        let mut identity = req.username.clone();
        let ip = req.peer.map(|p| p.ip());
        if ip.is_some_and(|ip| self.auth_throttle().blocked(ip)) {
            return Err(AttachError::Throttled);
        }
        let login = match (&self.hooks().authenticate, req.authenticated) {
            (_, true) => Login::allow(),
            (Some(hook), false) => {
                let info = ConnectInfo {
                    client_id: client_id.to_string(),
                    username: req.username.clone(),
                    password: req.password.clone(),
                    peer: req.peer,
                    listener: req.listener.clone(),
                    allow_anonymous: req.allow_anonymous,
                    username_from_certificate: req.certificate_identity,
                    protocol: req.protocol,
                };
                call_hook(self, "authenticate", &client_id, hook.authenticate(&info))
                    .await
                    .ok_or_else(|| {
                        AttachError::HookFailed("the authentication hook did not answer".into())
                    })?
            }
            // Nothing verifies a username without a hook: on a listener
            // that refuses anonymous clients only a certificate gets in.
            (None, false) if req.allow_anonymous || req.certificate_identity => Login::allow(),
            (None, false) => Login::NotAuthorized,
        };
        match login {
            Login::Allow { identity: Some(i) } => identity = Some(i),
            Login::Allow { identity: None } => {}
            Login::BadCredentials | Login::NotAuthorized => {
                Stats::bump(&self.stats().authentication_failures);
                if let Some(ip) = ip {
                    self.auth_throttle().failed(ip);
                }
                return Err(if login == Login::BadCredentials {
                    AttachError::BadCredentials
                } else {
                    AttachError::NotAuthorized
                });
            }
        }
        let client = Arc::new(ClientInfo {
            client_id: client_id.clone(),
            username: req.username,
            identity,
            peer: req.peer,
            listener: req.listener,
            protocol: req.protocol,
        });
        if let Some(will) = &req.will {
            if !may_publish_to(&will.message.topic, req.bridge) {
                return Err(AttachError::WillNotAuthorized);
            }
            if let Some(hook) = &self.hooks().authorize {
                let decision = call_hook(
                    self,
                    "authorize_publish",
                    &client_id,
                    hook.authorize_publish(&client, &will.message),
                )
                .await;
                if decision != Some(Decision::Allow) {
                    Stats::bump(&self.stats().authorization_denials);
                    return Err(AttachError::WillNotAuthorized);
                }
            }
        }
        let attachment = Attachment {
            connection_id: self.next_connection_id(),
            kick: CancellationToken::new(),
            detached: CancellationToken::new(),
            client: client.clone(),
            connected_at_ms: now_ms(),
        };
        let mut will = req.will;
        if let Some(w) = &mut will {
            w.message.id = self.next_message_id();
        }
        let connected = self
            .connect(
                client_id.clone(),
                req.clean_start,
                req.expiry,
                attachment.clone(),
                will.as_ref(),
            )
            .await?;
        let now = self
            .stats()
            .clients_connected
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        self.stats()
            .clients_maximum
            .fetch_max(now, Ordering::Relaxed);
        let present = connected.session_present;
        self.events().emit(|| Event::ClientConnected {
            client: client.clone(),
            session_present: present,
        });
        Ok(Attached {
            link: Link {
                core: self.clone(),
                session: connected.session,
                client,
                attachment,
                will,
                publish_cache: Vec::new(),
                detached: false,
                bridge: req.bridge,
            },
            session_present: present,
            assigned_id: assigned.then_some(client_id),
        })
    }

    /// Unique enough for a generated client id: a counter mixed with the clock.
    fn fresh_id(&self) -> u64 {
        let n = self.next_connection_id();
        now_ms().rotate_left(20) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// Clients may not publish under `$SYS/`: those topics are the broker's
/// (MQTT-4.7.2). A bridge may publish its own connection state under
/// `$SYS/broker/connection/` (Mosquitto's bridge `notifications`: a will
/// and a retained "1" there), as Mosquitto lets it.
fn may_publish_to(topic: &str, bridge: bool) -> bool {
    let sys = topic.starts_with("$SYS/") || topic == "$SYS";
    !sys || (bridge && topic.starts_with("$SYS/broker/connection/"))
}

/// One attached client's way into the broker. Dropping it detaches the
/// client as if its connection was lost (its will is published).
pub(crate) struct Link {
    core: Arc<Core>,
    session: Arc<Session>,
    client: Arc<ClientInfo>,
    attachment: Attachment,
    will: Option<Will>,
    /// Topics the authorization hook allowed, and when (see `Authorize::publish_cache`).
    publish_cache: Vec<(String, Instant)>,
    detached: bool,
    /// See [`AttachRequest::bridge`].
    bridge: bool,
}

impl Link {
    /// The broker's state (its settings and hooks, for the protocol code).
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The client id.
    pub(crate) fn client_id(&self) -> &ClientId {
        &self.session.client_id
    }

    /// Cancelled when the broker wants this client gone (takeover, an operator's kick).
    pub(crate) fn kicked(&self) -> &CancellationToken {
        &self.attachment.kick
    }

    /// Whether an operator kicked this connection (else a takeover did).
    pub(crate) fn kicked_by_operator(&self) -> bool {
        self.session
            .lock()
            .was_kicked(self.attachment.connection_id)
    }

    /// Whether an incoming QoS 2 message with `packet_id` was accepted and
    /// not yet released (a resend must not be routed again).
    pub(crate) fn holds_qos2(&self, packet_id: u16) -> bool {
        self.session.lock().incoming_qos2().contains(&packet_id)
    }

    /// The incoming QoS 2 packet ids held, sorted.
    pub(crate) fn held_qos2(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self
            .session
            .lock()
            .incoming_qos2()
            .iter()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Accept a message from this client. `qos2_id`: the packet id of a
    /// QoS 2 publish, held until PUBREL and stored with the message.
    pub(crate) async fn publish(
        &mut self,
        message: Message,
        qos2_id: Option<u16>,
    ) -> Result<Published, PublishRefused> {
        let max_levels = self.core.config().max_topic_levels;
        if topic::check_levels(&message.topic, max_levels).is_err() {
            self.core.note_deep_topic(self.client_id(), "PUBLISH topic");
            return Err(PublishRefused::TooDeep(max_levels));
        }
        if !may_publish_to(&message.topic, self.bridge) || !self.authorize_publish(&message).await {
            Stats::bump(&self.core.stats().authorization_denials);
            return Err(PublishRefused::NotAuthorized);
        }
        let extra = qos2_id.and_then(|id| {
            let mut st = self.session.lock();
            st.receive_qos2(id);
            st.persistent().then(|| PacketOp::IncomingQos2Received {
                client: self.session.client_id.clone(),
                packet_id: id,
            })
        });
        let accepted = match self
            .core
            .publish(message, &Origin::Client(self.client.clone()), extra)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                if let Some(id) = qos2_id {
                    self.session.lock().release_qos2(id);
                }
                return Err(e.into());
            }
        };
        let committed = match qos2_id {
            None => accepted.committed,
            Some(id) => {
                let session = self.session.clone();
                async move {
                    let r = accepted.committed.await;
                    if r.is_err() {
                        // Not acknowledged: the client's resend is a new message.
                        session.lock().release_qos2(id);
                    }
                    r
                }
                .boxed()
            }
        };
        Ok(Published {
            matched: accepted.matched,
            committed,
        })
    }

    /// Ask the authorization hook (or the cache) whether this publish may go.
    async fn authorize_publish(&mut self, message: &Message) -> bool {
        let Some(hook) = self.core.hooks().authorize.clone() else {
            return true;
        };
        let ttl = hook.publish_cache();
        if let Some(ttl) = ttl {
            let now = Instant::now();
            self.publish_cache
                .retain(|(_, at)| now.duration_since(*at) < ttl);
            if self.publish_cache.iter().any(|(t, _)| *t == message.topic) {
                return true;
            }
        }
        let allowed = call_hook(
            &self.core,
            "authorize_publish",
            self.client_id(),
            hook.authorize_publish(&self.client, message),
        )
        .await
            == Some(Decision::Allow);
        if allowed && ttl.is_some() {
            if self.publish_cache.len() >= PUBLISH_CACHE_SIZE {
                self.publish_cache.remove(0);
            }
            self.publish_cache
                .push((message.topic.clone(), Instant::now()));
        }
        allowed
    }

    /// The client acknowledged a delivery. The store change joins the next
    /// group commit and completes even if the client goes away.
    pub(crate) fn acknowledge(&self, ack: Ack) {
        let op = {
            let mut st = self.session.lock();
            match ack {
                Ack::Qos1Done(id) => st.complete(id, false),
                Ack::Received(id) => st.received(id),
                Ack::Refused(id) => st.abandon(id),
                Ack::Qos2Done(id) => st.complete(id, true),
            }
        };
        if let Some(op) = op {
            drop(self.core.submit(vec![op]));
        }
        self.session.wake.notify_one();
        if let Ack::Qos1Done(id) | Ack::Qos2Done(id) = ack {
            self.core.events().emit_message(|| Event::Acknowledged {
                client_id: self.session.client_id.clone(),
                packet_id: id,
            });
        }
    }

    /// PUBREL of an incoming QoS 2 message: `None` if the packet id is not
    /// held; else a future that resolves once the id is free in the store
    /// too (a restart would otherwise take the client's next message with
    /// this id for a duplicate).
    pub(crate) fn release(&self, packet_id: u16) -> Option<BoxFuture<'static, StorageResult<()>>> {
        let persistent = {
            let mut st = self.session.lock();
            if !st.release_qos2(packet_id) {
                return None;
            }
            st.persistent()
        };
        if !persistent {
            return Some(futures::future::ready(Ok(())).boxed());
        }
        Some(
            self.core
                .submit(vec![PacketOp::IncomingQos2Released {
                    client: self.session.client_id.clone(),
                    packet_id,
                }])
                .boxed(),
        )
    }

    /// Subscribe, each filter asked of the authorization hook first.
    /// Returns, in request order, what was granted or why it was refused.
    pub(crate) async fn subscribe(
        &self,
        requests: Vec<(String, SubscriptionOptions)>,
    ) -> StorageResult<Vec<Result<Granted, SubscribeRefusal>>> {
        let mut verdicts: Vec<Option<SubscribeRefusal>> = Vec::with_capacity(requests.len());
        let mut allowed = Vec::with_capacity(requests.len());
        let hook = self.core.hooks().authorize.clone();
        for (filter, mut options) in requests {
            if let Some(hook) = &hook {
                let decision = call_hook(
                    &self.core,
                    "authorize_subscribe",
                    self.client_id(),
                    hook.authorize_subscribe(&self.client, &filter, options.qos),
                )
                .await;
                match decision {
                    Some(SubscribeDecision::Allow(qos)) => options.qos = options.qos.min(qos),
                    _ => {
                        Stats::bump(&self.core.stats().authorization_denials);
                        verdicts.push(Some(SubscribeRefusal::NotAuthorized));
                        continue;
                    }
                }
            }
            verdicts.push(None);
            allowed.push((filter, options));
        }
        let filters: Vec<String> = allowed.iter().map(|(f, _)| f.clone()).collect();
        let mut granted = self
            .core
            .subscribe(&self.session, allowed)
            .await?
            .into_iter()
            .zip(filters);
        let mut outcomes = Vec::with_capacity(verdicts.len());
        for v in verdicts {
            match v {
                Some(refusal) => outcomes.push(Err(refusal)),
                None => {
                    let Some((outcome, filter)) = granted.next() else {
                        break;
                    };
                    if let Ok(g) = &outcome {
                        self.core.events().emit(|| Event::Subscribed {
                            client: self.client.clone(),
                            filter,
                            qos: g.qos,
                        });
                    }
                    outcomes.push(outcome);
                }
            }
        }
        Ok(outcomes)
    }

    /// Queue the retained messages matching `filter` (after SUBACK) behind
    /// the gate [`Granted::retained`] names.
    pub(crate) async fn deliver_retained(
        &self,
        filter: &str,
        options: &SubscriptionOptions,
        gate: crate::message::Seq,
    ) -> StorageResult<()> {
        self.core
            .deliver_retained(&self.session, filter, options, gate)
            .await
    }

    /// Unsubscribe from `filters`.
    pub(crate) async fn unsubscribe(
        &self,
        filters: Vec<String>,
    ) -> StorageResult<Vec<Unsubscribed>> {
        let outcomes = self
            .core
            .unsubscribe(&self.session, filters.clone())
            .await?;
        for (f, o) in filters.into_iter().zip(&outcomes) {
            if *o == Unsubscribed::Removed {
                self.core.events().emit(|| Event::Unsubscribed {
                    client: self.client.clone(),
                    filter: f,
                });
            }
        }
        Ok(outcomes)
    }

    /// Change how long the session outlives this connection (MQTT 5
    /// DISCONNECT with a Session Expiry Interval).
    pub(crate) fn set_expiry(&self, expiry: SessionExpiry) {
        self.session.lock().set_expiry_secs(expiry.secs());
    }

    /// The outbox of this client's deliveries, within `max_inflight`.
    pub(crate) fn outbox(&self, max_inflight: usize) -> Outbox {
        Outbox {
            core: self.core.clone(),
            session: self.session.clone(),
            client: self.client.clone(),
            max_inflight,
            ops: Vec::new(),
        }
    }

    /// The client is gone: publish its will if `lost` (it did not
    /// disconnect normally), keep or discard its session, tell listeners.
    /// The client deleted its will (normal DISCONNECT): forget it, in the
    /// store too, before returning.
    pub(crate) async fn delete_will(&mut self) {
        if let Some(will) = self.will.take() {
            self.core.forget_will(&self.session.client_id, &will).await;
        }
    }

    pub(crate) async fn detach(mut self, lost: bool, reason: &str) {
        self.detached = true;
        finish_detach(
            self.core.clone(),
            self.session.clone(),
            self.client.clone(),
            self.attachment.clone(),
            self.will.take().map(|w| (w, lost)),
            reason.to_string(),
        )
        .await;
    }
}

/// `will` is the connection's will and whether it is published (the
/// connection was lost) or deleted (normal DISCONNECT).
async fn finish_detach(
    core: Arc<Core>,
    session: Arc<Session>,
    client: Arc<ClientInfo>,
    attachment: Attachment,
    will: Option<(Will, bool)>,
    reason: String,
) {
    match will {
        Some((will, true)) => core.schedule_will(Some(&session), will, client.clone()),
        Some((will, false)) => core.forget_will(&session.client_id, &will).await,
        None => {}
    }
    core.disconnect(&session, attachment.connection_id).await;
    attachment.detached.cancel();
    core.stats()
        .clients_connected
        .fetch_sub(1, Ordering::Relaxed);
    core.events()
        .emit(|| Event::ClientDisconnected { client, reason });
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let detach = finish_detach(
            self.core.clone(),
            self.session.clone(),
            self.client.clone(),
            self.attachment.clone(),
            self.will.take().map(|w| (w, true)),
            "dropped without disconnecting".to_string(),
        );
        if tokio::runtime::Handle::try_current().is_ok() {
            self.core.spawn_tracked(detach);
        } else {
            info!(client = %self.session.client_id, "link dropped outside the runtime: session detached at expiry only");
        }
    }
}

/// A client's deliveries, in session order, for whatever writes them out
/// (a connection's writer, an in-process client).
pub(crate) struct Outbox {
    core: Arc<Core>,
    session: Arc<Session>,
    client: Arc<ClientInfo>,
    max_inflight: usize,
    ops: Vec<PacketOp>,
}

impl Outbox {
    /// Move what may be sent now into `out`, in order, within the in-flight
    /// window, until about `budget` bytes of payload and topic are taken.
    /// Messages the delivery authorization denies are dropped here, as if
    /// delivered. Returns true when it stopped at the budget with more to send.
    pub(crate) fn take(&mut self, budget: usize, out: &mut Vec<Outgoing>) -> bool {
        let (more, page) = {
            let mut st = self.session.lock();
            let more = st.next_outgoing(self.max_inflight, budget, out, &mut self.ops);
            let page = self.core.config().queue_page;
            let ahead = paging::read_ahead(page, self.max_inflight);
            (more, st.page_wanted(ahead, page))
        };
        if let Some(request) = page {
            self.core.read_page(self.session.clone(), request);
        }
        if let Some(hook) = &self.core.hooks().authorize {
            out.retain(|o| {
                let Outgoing::Publish {
                    message, packet_id, ..
                } = o
                else {
                    return true;
                };
                let decision = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    hook.authorize_delivery(&self.client, message)
                }));
                if matches!(decision, Ok(Decision::Allow)) {
                    return true;
                }
                if decision.is_err() {
                    Stats::bump(&self.core.stats().hook_failures);
                }
                Stats::bump(&self.core.stats().authorization_denials);
                if let Some(id) = packet_id {
                    self.ops.extend(self.session.lock().abandon(*id));
                }
                false
            });
        }
        let events = self.core.events();
        let mut sent = 0u64;
        let mut by_qos = [0u64; 3];
        for o in out.iter() {
            if let Outgoing::Publish {
                message,
                packet_id,
                qos,
                ..
            } = o
            {
                sent += 1;
                by_qos[*qos as usize] += 1;
                events.emit_message(|| Event::Delivered {
                    client_id: self.session.client_id.clone(),
                    message: message.clone(),
                    qos: *qos,
                    packet_id: packet_id.filter(|_| *qos != QoS::AtMostOnce),
                });
            }
        }
        if sent > 0 {
            self.core.stats().sent.fetch_add(sent, Ordering::Relaxed);
            for (qos, n) in by_qos.into_iter().enumerate().filter(|(_, n)| *n > 0) {
                self.core.stats().messages_out.add(qos, n);
            }
        }
        self.flush_ops();
        more
    }

    /// A delivery that cannot be sent (larger than the client accepts): it
    /// ends as if delivered, and its store entry goes with it.
    pub(crate) fn abandon(&mut self, packet_id: u16) {
        self.core
            .stats()
            .drops
            .bump(metrics::DropLabel::PacketTooLarge as usize);
        self.ops.extend(self.session.lock().abandon(packet_id));
        self.flush_ops();
    }

    /// Count bytes written to the client.
    pub(crate) fn wrote(&self, bytes: usize) {
        self.core
            .stats()
            .bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Resolves when there may be something new to take.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.session.wake.notified()
    }

    fn flush_ops(&mut self) {
        if !self.ops.is_empty() {
            // Removals of expired, refused or undeliverable entries; a
            // failure is logged by the group commit.
            drop(self.core.submit(std::mem::take(&mut self.ops)));
        }
    }
}
