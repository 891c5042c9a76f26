//! Subscription options, as granted to a session for one topic filter.

use serde::{Deserialize, Serialize};

use crate::message::QoS;

/// What a session asked for when it subscribed to a filter.
///
/// MQTT 3.1.1 subscriptions only use `qos`; the other fields are MQTT 5
/// subscription options and keep their defaults for 3.1.1 clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionOptions {
    /// Maximum QoS granted.
    pub qos: QoS,
    /// Do not deliver the session's own publications back to it.
    pub no_local: bool,
    /// Keep the retain flag of the publication on live deliveries.
    pub retain_as_published: bool,
    /// 0: send retained messages on subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
    /// Subscription identifier delivered with matching messages.
    pub subscription_id: Option<u32>,
}

impl SubscriptionOptions {
    /// Options for a plain subscription at `qos`.
    pub fn new(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }
}
