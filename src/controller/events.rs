//! Publishing Kubernetes Events. A failed publish is logged, never fatal.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

use super::leader::WriteGate;

/// An Event recorder that stays silent while this replica may not write (it does not lead).
#[derive(Clone)]
pub struct GatedRecorder {
    recorder: Recorder,
    gate: WriteGate,
}

impl GatedRecorder {
    pub fn new(recorder: Recorder, gate: WriteGate) -> Self {
        Self { recorder, gate }
    }
}

/// Longest note the Events API accepts.
const MAX_NOTE: usize = 1024;

/// Publishes an Event about `obj`.
pub async fn publish<K: Resource<DynamicType = ()>>(
    recorder: &GatedRecorder,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: impl Into<String>,
) {
    if !recorder.gate.is_open() {
        tracing::debug!(reason, "not leading: Event not published");
        return;
    }
    let mut note = note.into();
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder
        .recorder
        .publish(&event, &obj.object_ref(&()))
        .await
    {
        tracing::warn!(error = %e, reason, "publishing an Event failed");
    }
}
