//! Who hears of a connection: the events a side's connection sends its publisher, and the
//! tenants of a sink connection that relays share ([`Tenants`]), each of which hears of its own
//! publishes only. Both the connection and the shared-connection pool use these; neither
//! imports the other's internals.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use super::Context;
use super::mqtt::{Client, Tenant};
use super::status::{Side, SideState};

/// Connection events, from a side's connection to the same side's publisher.
pub(super) enum ConnEvent {
    Connected {
        client: Client,
    },
    /// What one batch of packets did to the publishes in flight, in order.
    Progress(Vec<Progress>),
    /// `suspect`: the oldest publish written and not acknowledged was this publisher's (always
    /// so on a connection of its own), so a quick end may be a refusal of it.
    Disconnected {
        suspect: bool,
    },
}

/// A publish in flight moved on.
pub(super) enum Progress {
    /// A publish with this packet id was written to the socket.
    Sent { tenant: Tenant, pkid: u16 },
    /// The broker acknowledged it; `refused`: its reason code when it refused the message
    /// (MQTT 5).
    Acked {
        tenant: Tenant,
        pkid: u16,
        refused: Option<String>,
    },
}

impl Progress {
    pub fn tenant(&self) -> Tenant {
        match self {
            Progress::Sent { tenant, .. } | Progress::Acked { tenant, .. } => *tenant,
        }
    }
}

/// Who hears of a connection: the publisher of its relay's side, or, on a connection that
/// relays share, every sharing relay's publisher (each hears of its own publishes only).
pub(super) enum Peers {
    Own(mpsc::UnboundedSender<ConnEvent>),
    Shared(Arc<Tenants>),
}

impl Peers {
    pub fn connected(&self, client: &Client) {
        match self {
            Peers::Own(events) => {
                let _ = events.send(ConnEvent::Connected {
                    client: client.clone(),
                });
            }
            Peers::Shared(tenants) => tenants.connected(client),
        }
    }

    pub fn progress(&self, steps: Vec<Progress>) {
        match self {
            Peers::Own(events) => {
                let _ = events.send(ConnEvent::Progress(steps));
            }
            Peers::Shared(tenants) => tenants.progress(steps),
        }
    }

    /// `suspect`: whose publish was the oldest written and not acknowledged, if any.
    pub fn disconnected(&self, suspect: Option<Tenant>) {
        match self {
            Peers::Own(events) => {
                let _ = events.send(ConnEvent::Disconnected { suspect: true });
            }
            Peers::Shared(tenants) => tenants.disconnected(suspect),
        }
    }

    pub fn state(&self, ctx: &Context, side: Side, state: SideState, error: Option<String>) {
        match self {
            Peers::Own(_) => ctx.report.state(side, state, error),
            Peers::Shared(tenants) => tenants.state(side, state, error),
        }
    }

    pub fn reconnected(&self, ctx: &Context, side: Side) {
        match self {
            Peers::Own(_) => ctx.report.reconnected(side),
            Peers::Shared(tenants) => tenants.reconnected(side),
        }
    }
}

/// One sharing relay.
pub(super) struct Member {
    pub id: Tenant,
    pub events: mpsc::UnboundedSender<ConnEvent>,
    pub ctx: Arc<Context>,
}

#[derive(Default)]
pub(super) struct Table {
    /// Ordered by id.
    pub members: Vec<Member>,
    pub next: Tenant,
    /// The connection's client while it is up.
    pub client: Option<Client>,
    /// The connection's last state and error, for a tenant that joins.
    pub state: Option<(SideState, Option<String>)>,
}

impl Table {
    fn member(&self, id: Tenant) -> Option<&Member> {
        self.members
            .binary_search_by_key(&id, |m| m.id)
            .ok()
            .map(|i| &self.members[i])
    }
}

/// The tenants of one shared connection: what the connection tells them.
pub(super) struct Tenants(Mutex<Table>);

impl Tenants {
    pub fn new() -> Self {
        Tenants(Mutex::new(Table::default()))
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing in the table is left half-updated by a panic.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn connected(&self, client: &Client) {
        let mut t = self.lock();
        t.client = Some(client.clone());
        for m in &t.members {
            let _ = m.events.send(ConnEvent::Connected {
                client: client.for_tenant(m.id),
            });
        }
    }

    /// Hands each tenant the steps of its own publishes, in order.
    pub fn progress(&self, steps: Vec<Progress>) {
        let t = self.lock();
        // Most batches are one tenant's: handed on whole.
        if let Some(first) = steps.first().map(Progress::tenant)
            && steps.iter().all(|s| s.tenant() == first)
        {
            if let Some(m) = t.member(first) {
                let _ = m.events.send(ConnEvent::Progress(steps));
            }
            return;
        }
        let mut steps = steps.into_iter().peekable();
        while let Some(first) = steps.next() {
            let tenant = first.tenant();
            let mut run = vec![first];
            while let Some(next) = steps.next_if(|s| s.tenant() == tenant) {
                run.push(next);
            }
            // A tenant that has left has no publisher to tell.
            if let Some(m) = t.member(tenant) {
                let _ = m.events.send(ConnEvent::Progress(run));
            }
        }
    }

    pub fn disconnected(&self, suspect: Option<Tenant>) {
        let mut t = self.lock();
        t.client = None;
        for m in &t.members {
            let _ = m.events.send(ConnEvent::Disconnected {
                suspect: suspect == Some(m.id),
            });
        }
    }

    pub fn state(&self, side: Side, state: SideState, error: Option<String>) {
        let mut t = self.lock();
        for m in &t.members {
            m.ctx.report.state(side, state, error.clone());
        }
        t.state = Some((state, error));
    }

    pub fn reconnected(&self, side: Side) {
        for m in &self.lock().members {
            m.ctx.report.reconnected(side);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lock().members.is_empty()
    }
}
