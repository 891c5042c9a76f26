//! The sessions by client id: attach (with takeover of a connection that
//! holds the session), detach, discard. One lifecycle lock per client id
//! (striped) orders these for one client; routing does not take it.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tracing::{info, warn};

use super::wills::delete_will;
use super::{Core, SessionExpiry, Will, LIFECYCLE_STRIPES, TAKEOVER_WAIT};
use crate::events::Event;
use crate::message::now_ms;
use crate::session::{Attachment, Session};
use crate::storage::{ClientId, PacketOp, SessionRecord, StorageResult};

/// Result of a successful attach.
pub(crate) struct Connected {
    /// The session now attached to the connection.
    pub(crate) session: Arc<Session>,
    /// Whether a stored session was resumed (CONNACK session-present).
    pub(crate) session_present: bool,
}

/// The stored form of a session's metadata.
pub(super) fn session_record(
    client_id: &str,
    expiry_secs: Option<u64>,
    disconnected_at_ms: Option<u64>,
) -> SessionRecord {
    SessionRecord {
        client_id: client_id.to_string(),
        expiry_secs: expiry_secs.map(|e| e.min(u32::MAX as u64) as u32),
        disconnected_at_ms,
    }
}

impl Core {
    pub(super) fn lifecycle_lock(&self, client_id: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut h);
        &self.lifecycle[(h.finish() as usize) % LIFECYCLE_STRIPES]
    }

    /// Attach a connection to the session of `client_id`, taking it over from
    /// another connection if needed. `clean_start` discards any previous
    /// session; `expiry` says how long the session outlives this connection.
    /// The connection's `will` is stored before this returns (see `wills`).
    pub(crate) async fn connect(
        &self,
        client_id: ClientId,
        clean_start: bool,
        expiry: SessionExpiry,
        attachment: Attachment,
        will: Option<&Will>,
    ) -> StorageResult<Connected> {
        let lock = self.lifecycle_lock(&client_id);
        let mut guard = lock.lock().await;
        // Session takeover: close the other connection and wait until it has detached.
        loop {
            let current = self
                .session(&client_id)
                .and_then(|s| s.lock().connection().cloned());
            let Some(old) = current else { break };
            info!(client = %client_id, "session taken over by a new connection");
            old.kick.cancel();
            drop(guard);
            if tokio::time::timeout(TAKEOVER_WAIT, old.detached.cancelled())
                .await
                .is_err()
            {
                warn!(client = %client_id, "previous connection did not close in time");
            }
            guard = lock.lock().await;
            if let Some(s) = self.session(&client_id) {
                let mut st = s.lock();
                if st
                    .connection()
                    .is_some_and(|c| c.connection_id == old.connection_id)
                {
                    // It never detached: force it.
                    st.force_detach();
                }
            }
        }
        let existing = self.session(&client_id);
        let mut wills = Vec::new();
        if let Some(s) = &existing {
            // A new connection before the will delay passed: the will is dropped.
            if let Some((pending, id)) = s.lock().take_pending_will() {
                pending.cancel();
                wills.push(delete_will(&client_id, id));
            }
        }
        if let Some(w) = will {
            wills.push(PacketOp::StoreWill {
                will: w.stored(&client_id),
            });
        }
        self.expiry.cancel(&client_id);
        // An expired session the expiry task has not reached yet is gone all the same.
        let now = now_ms();
        let resumable = existing
            .as_ref()
            .filter(|s| {
                let st = s.lock();
                st.persistent() && !st.has_expired(now)
            })
            .cloned();
        let (session, present) = match (clean_start, resumable) {
            (false, Some(s)) => {
                // Connected again: a crash from now on must not count the
                // offline time from the previous disconnect. The new
                // connection's expiry replaces the old one.
                s.lock().set_expiry_secs(expiry.secs());
                self.storage
                    .subscriptions
                    .save_session(&session_record(&client_id, expiry.secs(), None))
                    .await?;
                (s, true)
            }
            _ => {
                if let Some(old) = existing {
                    self.discard(&old).await?;
                }
                let persistent = expiry != SessionExpiry::OnDisconnect;
                let s = Arc::new(Session::new(client_id.clone(), persistent, expiry.secs()));
                if persistent {
                    self.storage
                        .subscriptions
                        .save_session(&session_record(&client_id, expiry.secs(), None))
                        .await?;
                }
                self.sessions.lock().insert(client_id.clone(), s.clone());
                (s, false)
            }
        };
        // Stored before CONNACK, after the session is in place: a will in
        // the store belongs to a connection that was accepted.
        if !wills.is_empty() {
            self.submit(wills).await?;
        }
        session.lock().attach(attachment);
        drop(guard);
        session.wake.notify_one();
        self.events.emit(|| {
            if present {
                Event::SessionResumed {
                    client_id: client_id.clone(),
                }
            } else {
                Event::SessionCreated {
                    client_id: client_id.clone(),
                }
            }
        });
        Ok(Connected {
            session,
            session_present: present,
        })
    }

    /// The connection `connection_id` ended. Persistent sessions stay (their
    /// expiry starts now); others are discarded.
    pub(crate) async fn disconnect(&self, session: &Arc<Session>, connection_id: u64) {
        let _guard = self.lifecycle_lock(&session.client_id).lock().await;
        let now = now_ms();
        let (persistent, expiry) = {
            let mut st = session.lock();
            if !st.detach(connection_id, now) {
                return;
            }
            (st.persistent(), st.expiry_secs())
        };
        if persistent && expiry != Some(0) {
            let record = session_record(&session.client_id, expiry, Some(now));
            if let Err(e) = self.storage.subscriptions.save_session(&record).await {
                warn!(client = %session.client_id, error = %e.report(), "could not record the disconnect time");
            }
            if let Some(secs) = expiry {
                self.expiry.schedule(
                    &session.client_id,
                    now.saturating_add(secs.saturating_mul(1000)),
                );
            }
            // Messages a shared subscription chose this session for go to a
            // member that is online, if the group has one.
            let online_elsewhere = |share: &str| self.group_has_online_member(share, session);
            if let Err(e) = self.redistribute(session, online_elsewhere, false).await {
                warn!(client = %session.client_id, error = %e.report(), "could not hand shared messages to another member");
            }
        } else if let Err(e) = self.discard(session).await {
            warn!(client = %session.client_id, error = %e.report(), "could not discard the session");
        }
    }

    /// An operator deletes `client_id`'s session: its connection is kicked
    /// (and waited for, as in a takeover), then the session is discarded.
    /// False when there was none.
    pub(crate) async fn delete_session(&self, client_id: &str) -> StorageResult<bool> {
        let lock = self.lifecycle_lock(client_id);
        let mut guard = lock.lock().await;
        loop {
            let Some(session) = self.session(client_id) else {
                return Ok(false);
            };
            let attached = {
                let mut st = session.lock();
                let c = st.connection().cloned();
                st.kick();
                c
            };
            let Some(old) = attached else {
                self.discard(&session).await?;
                drop(guard);
                info!(client = %client_id, "session deleted by an operator");
                return Ok(true);
            };
            drop(guard);
            if tokio::time::timeout(TAKEOVER_WAIT, old.detached.cancelled())
                .await
                .is_err()
            {
                warn!(client = %client_id, "kicked connection did not close in time");
            }
            guard = lock.lock().await;
            let mut st = session.lock();
            if st
                .connection()
                .is_some_and(|c| c.connection_id == old.connection_id)
            {
                st.force_detach();
            }
        }
    }

    /// Remove a session: its subscriptions from the trie, its queue and record
    /// from the store. What shared subscriptions queued for it goes to other members.
    pub(super) async fn discard(&self, session: &Arc<Session>) -> StorageResult<()> {
        let filters: Vec<String> = session.lock().subscriptions().keys().cloned().collect();
        {
            let mut trie = self.trie.write();
            for f in &filters {
                super::routing::remove_subscription(&mut trie, f, &session.client_id);
            }
        }
        self.expiry.cancel(&session.client_id);
        // No new message can reach the session now. Let enqueues already being
        // written land first, so that the purge below cannot be overtaken by
        // one of them and leave orphan entries in the store.
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        while session.lock().has_pending() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // What shared subscriptions chose the session for may still be in
        // the store: read it in so that it can go to another member.
        let shared = session
            .lock()
            .subscriptions()
            .keys()
            .any(|f| f.starts_with("$share/"));
        if shared {
            self.read_whole(session).await?;
        }
        self.redistribute(session, |_| true, true).await?;
        let persistent = {
            let mut st = session.lock();
            st.clear();
            st.persistent()
        };
        {
            let mut sessions = self.sessions.lock();
            if sessions
                .get(&session.client_id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.client_id);
            }
        }
        if persistent {
            self.submit(vec![PacketOp::Purge {
                client: session.client_id.clone(),
            }])
            .await?;
            self.storage
                .subscriptions
                .delete_session(&session.client_id)
                .await?;
        }
        Ok(())
    }
}
