//! Subscribe and unsubscribe: filters checked against the broker's
//! settings and limits, the trie and the session updated together, the
//! store after.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, warn};

use super::routing::{insert_subscription, remove_subscription};
use super::Core;
use crate::message::QoS;
use crate::session::Session;
use crate::storage::{ClientId, StorageResult, SubscriptionRecord};
use crate::subscription::SubscriptionOptions;
use crate::topic::{self, SharedFilter};

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeRefusal {
    /// Not a valid filter (or a malformed `$share/` one).
    #[error("not a valid topic filter")]
    InvalidFilter,
    /// Shared subscriptions are disabled.
    #[error("shared subscriptions are not supported")]
    SharedNotSupported,
    /// Wildcards are disabled.
    #[error("wildcard subscriptions are not supported")]
    WildcardsNotSupported,
    /// More levels than `max_topic_levels`.
    #[error("the filter has more levels than max_topic_levels")]
    TooManyLevels,
    /// The session holds `max_subscriptions_per_client` already.
    #[error("the session holds max_subscriptions_per_client subscriptions")]
    QuotaExceeded,
    /// The authorization hook denied it (or could not decide).
    #[error("not authorized")]
    NotAuthorized,
}

/// A subscription granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Granted {
    /// QoS granted (the request, capped by the broker's maximum).
    pub(crate) qos: QoS,
    /// The session already had a subscription with this filter (replaced).
    pub(crate) existed: bool,
    /// A `$share/` subscription (no retained messages on subscribe).
    pub(crate) shared: bool,
    /// The gate behind which this subscription's retained messages are to
    /// be queued, after SUBACK, with [`Core::deliver_retained`]; `None` when
    /// none are due: retained messages are off, a shared subscription, or
    /// Retain Handling 1 on an existing subscription or 2 (MQTT 5 3.8.3.1).
    pub(crate) retained: Option<crate::message::Seq>,
}

/// Outcome of unsubscribing one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsubscribed {
    /// The subscription was removed.
    Removed,
    /// The session had no subscription with this filter.
    NotSubscribed,
    /// Not a valid filter.
    InvalidFilter,
}

impl Core {
    /// Subscribe a session. Returns, in request order, what was granted or why
    /// it was refused.
    pub(crate) async fn subscribe(
        &self,
        session: &Arc<Session>,
        requests: Vec<(String, SubscriptionOptions)>,
    ) -> StorageResult<Vec<Result<Granted, SubscribeRefusal>>> {
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut records = Vec::new();
        {
            let mut trie = self.trie.write();
            let mut st = session.lock();
            for (filter, mut options) in requests {
                let existed = st.subscriptions().contains_key(&filter);
                let checked = self.check_filter(&filter).and_then(|shared| {
                    if !existed
                        && st.subscriptions().len() >= self.config.max_subscriptions_per_client
                    {
                        Err(SubscribeRefusal::QuotaExceeded)
                    } else {
                        Ok(shared)
                    }
                });
                let shared = match checked {
                    Ok(shared) => shared,
                    Err(refusal) => {
                        self.note_refusal(&session.client_id, &filter, refusal);
                        outcomes.push(Err(refusal));
                        continue;
                    }
                };
                options.qos = options.qos.min(self.config.max_qos());
                insert_subscription(&mut trie, &filter, shared, session, &options);
                let wanted = match options.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
                // With the trie still locked: no message routed through the
                // new subscription can be queued before the gate.
                let retained = (wanted && shared.is_none() && self.config.retain_available)
                    .then(|| st.open_gate(self.retained_slots()));
                outcomes.push(Ok(Granted {
                    qos: options.qos,
                    existed,
                    shared: shared.is_some(),
                    retained,
                }));
                st.add_subscription(filter.clone(), options.clone());
                records.push(SubscriptionRecord { filter, options });
            }
        }
        let persistent = session.lock().persistent();
        if persistent && !records.is_empty() {
            self.storage
                .subscriptions
                .add_subscriptions(&session.client_id, &records)
                .await?;
        }
        Ok(outcomes)
    }

    /// Whether the broker accepts `filter`; its shared parts if it is `$share/`.
    fn check_filter<'a>(
        &self,
        filter: &'a str,
    ) -> Result<Option<SharedFilter<'a>>, SubscribeRefusal> {
        let shared = topic::parse_shared(filter).map_err(|_| SubscribeRefusal::InvalidFilter)?;
        let inner = shared.map_or(filter, |s| s.filter);
        topic::validate_filter(inner).map_err(|_| SubscribeRefusal::InvalidFilter)?;
        topic::check_levels(inner, self.config.max_topic_levels)
            .map_err(|_| SubscribeRefusal::TooManyLevels)?;
        if shared.is_some() && !self.config.shared_subscriptions {
            return Err(SubscribeRefusal::SharedNotSupported);
        }
        if topic::has_wildcard(inner) && !self.config.wildcard_subscriptions {
            return Err(SubscribeRefusal::WildcardsNotSupported);
        }
        Ok(shared)
    }

    /// Count and log a refused subscription. The log is rate-limited per
    /// kind by the counters: a subscription bomb does not flood it.
    fn note_refusal(&self, client: &ClientId, filter: &str, refusal: SubscribeRefusal) {
        let counter = match refusal {
            SubscribeRefusal::QuotaExceeded => &self.stats.subscriptions_refused,
            SubscribeRefusal::TooManyLevels => &self.stats.topics_too_deep,
            _ => {
                debug!(%client, %filter, ?refusal, "subscription refused");
                return;
            }
        };
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(1000) {
            // A filter can be 64 KB: log its start only.
            let start: String = filter.chars().take(64).collect();
            warn!(
                %client,
                filter = %start,
                ?refusal,
                max_subscriptions_per_client = self.config.max_subscriptions_per_client,
                max_topic_levels = self.config.max_topic_levels,
                refused_so_far = n,
                "subscription refused by a limit"
            );
        }
    }

    /// Count and log a topic name refused by `max_topic_levels`.
    pub(crate) fn note_deep_topic(&self, client: &ClientId, what: &str) {
        let n = self.stats.topics_too_deep.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(1000) {
            warn!(%client, what, max_topic_levels = self.config.max_topic_levels, refused_so_far = n, "topic with too many levels refused");
        }
    }

    /// Unsubscribe a session from `filters`. Messages a shared subscription
    /// queued for it and not yet sent go to the group's other members.
    pub(crate) async fn unsubscribe(
        &self,
        session: &Arc<Session>,
        filters: Vec<String>,
    ) -> StorageResult<Vec<Unsubscribed>> {
        let mut outcomes = Vec::with_capacity(filters.len());
        let mut removed = Vec::new();
        let persistent = {
            let mut trie = self.trie.write();
            let mut st = session.lock();
            for f in filters {
                let max_levels = self.config.max_topic_levels;
                if topic::parse_shared(&f)
                    .ok()
                    .and_then(|s| {
                        let inner = s.map_or(f.as_str(), |s| s.filter);
                        topic::validate_filter(inner)
                            .and_then(|_| topic::check_levels(inner, max_levels))
                            .ok()
                    })
                    .is_none()
                {
                    outcomes.push(Unsubscribed::InvalidFilter);
                    continue;
                }
                remove_subscription(&mut trie, &f, &session.client_id);
                if st.remove_subscription(&f) {
                    outcomes.push(Unsubscribed::Removed);
                    removed.push(f);
                } else {
                    outcomes.push(Unsubscribed::NotSubscribed);
                }
            }
            st.persistent()
        };
        if persistent && !removed.is_empty() {
            self.storage
                .subscriptions
                .remove_subscriptions(&session.client_id, &removed)
                .await?;
        }
        let left: Vec<&String> = removed
            .iter()
            .filter(|f| f.starts_with("$share/"))
            .collect();
        if !left.is_empty() {
            self.redistribute(session, |g| left.iter().any(|f| f.as_str() == g), false)
                .await?;
        }
        Ok(outcomes)
    }
}
