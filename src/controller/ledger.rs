//! Each binding's record ([`Memory`]) in ConfigMaps of the operator's own namespace, so that it
//! scales with the pool (status stays small) and survives restarts.
//!
//! Layout for the binding with uid `U`: a head ConfigMap `iot-operator-record-U` holds the
//! generation, the explicit targets and pools, and the foreign targets when they fit; larger
//! foreign lists go to parts `iot-operator-record-U-<generation>-<n>`, where the generation is a
//! counter and a random suffix, so that two writers never write the same part. A new record
//! writes its
//! parts first and then replaces the head (with the head's resourceVersion as a precondition), so
//! a crash at any instant leaves the old record or the new one whole. Parts of other generations
//! are deleted after the head points past them. Users need no access to these ConfigMaps; only
//! the operator writes them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};

use super::leader::WriteGate;
use crate::policy::{Journal, JournalError, Memory, SyncProgress};

/// Label on every ConfigMap of a record; its value is the binding's uid.
pub const RECORD_LABEL: &str = "iot.operator.dev/record";
/// Annotation on the head naming the binding (`<namespace>/<name>`), for people reading it.
pub const BINDING_ANNOTATION: &str = "iot.operator.dev/binding";
/// Foreign targets kept in the head up to this many bytes; above it they move to parts.
const INLINE_BYTES: usize = 256 * 1024;
/// Bytes of foreign targets a part holds at most (a ConfigMap holds at most 1 MiB).
const PART_BYTES: usize = 768 * 1024;

/// Which binding a record belongs to.
#[derive(Debug, Clone)]
pub struct RecordKey {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

impl RecordKey {
    /// Name of the head ConfigMap.
    pub fn head(&self) -> String {
        format!("iot-operator-record-{}", self.uid)
    }

    fn part(&self, generation: &str, n: usize) -> String {
        format!("{}-{generation}-{n}", self.head())
    }
}

/// A record as last read or written, with the head's resourceVersion.
#[derive(Debug, Clone)]
struct Cached {
    resource_version: String,
    /// `<counter>-<random>`; empty for a record without parts written.
    generation: String,
    parts: usize,
    memory: Memory,
}

/// Reads and writes records; remembers the last one of each binding so that an unchanged record
/// costs one small read.
pub struct Ledger {
    api: Api<ConfigMap>,
    namespace: String,
    /// Per binding uid: the record last read or written; `None` when the head was seen absent.
    cache: Mutex<HashMap<String, Option<Cached>>>,
}

/// Sizes of the last write, for status and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// ConfigMaps written.
    pub objects: usize,
    /// Bytes of the largest ConfigMap written (data only).
    pub largest_bytes: usize,
}

fn lines(items: &BTreeSet<String>) -> String {
    let mut s = String::with_capacity(items.iter().map(|i| i.len() + 1).sum());
    for i in items {
        s.push_str(i);
        s.push('\n');
    }
    s
}

fn parse(text: Option<&String>) -> BTreeSet<String> {
    text.map(|t| {
        t.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// Splits the foreign targets into parts of at most [`PART_BYTES`], one target per line.
fn split(foreign: &BTreeSet<String>) -> Vec<String> {
    let mut parts = vec![String::new()];
    for t in foreign {
        let last = parts.last_mut().map_or(0, |p| p.len());
        if last + t.len() + 1 > PART_BYTES && last > 0 {
            parts.push(String::new());
        }
        if let Some(p) = parts.last_mut() {
            p.push_str(t);
            p.push('\n');
        }
    }
    parts
}

fn data_bytes(data: &BTreeMap<String, String>) -> usize {
    data.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// The ConfigMaps a record of `memory` takes when written whole: how many, and the data bytes of
/// the largest (for the pool benchmark; [`Ledger::store`] lays records out the same way).
pub fn layout(memory: &Memory) -> Written {
    let foreign = lines(&memory.foreign);
    let head = lines(&memory.targets).len() + lines(&memory.pools).len() + 64;
    if foreign.len() <= INLINE_BYTES {
        return Written {
            objects: 1,
            largest_bytes: head + foreign.len(),
        };
    }
    let parts = split(&memory.foreign);
    Written {
        objects: parts.len() + 1,
        largest_bytes: parts
            .iter()
            .map(|p| p.len() + "foreign".len())
            .max()
            .unwrap_or(0)
            .max(head),
    }
}

impl Ledger {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Namespace the records live in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `None`: never seen; `Some(None)`: seen absent.
    fn cached(&self, uid: &str) -> Option<Option<Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    fn remember(&self, uid: &str, entry: Option<Option<Cached>>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match entry {
            Some(e) => cache.insert(uid.to_owned(), e),
            None => cache.remove(uid),
        };
    }

    /// The binding's record; `None` when it has none yet.
    pub async fn load(&self, key: &RecordKey) -> Result<Option<Memory>, kube::Error> {
        let Some(head) = self.api.get_opt(&key.head()).await? else {
            self.remember(&key.uid, Some(None));
            return Ok(None);
        };
        let rv = head.metadata.resource_version.clone().unwrap_or_default();
        if let Some(Some(c)) = self.cached(&key.uid)
            && c.resource_version == rv
        {
            return Ok(Some(c.memory));
        }
        let data = head.data.unwrap_or_default();
        let generation = data.get("generation").cloned().unwrap_or_default();
        let parts: usize = data.get("parts").and_then(|p| p.parse().ok()).unwrap_or(0);
        let mut memory = Memory {
            targets: parse(data.get("targets")),
            pools: parse(data.get("pools")),
            foreign: parse(data.get("foreign")),
        };
        for n in 0..parts {
            let part = self.api.get(&key.part(&generation, n)).await?;
            memory
                .foreign
                .extend(parse(part.data.unwrap_or_default().get("foreign")));
        }
        self.remember(
            &key.uid,
            Some(Some(Cached {
                resource_version: rv,
                generation,
                parts,
                memory: memory.clone(),
            })),
        );
        Ok(Some(memory))
    }

    fn meta(&self, key: &RecordKey, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(BTreeMap::from([
                (RECORD_LABEL.to_owned(), key.uid.clone()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "iot-operator".to_owned(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(
                BINDING_ANNOTATION.to_owned(),
                format!("{}/{}", key.namespace, key.name),
            )])),
            ..ObjectMeta::default()
        }
    }

    /// Creates one ConfigMap, or replaces it at `resource_version`. A part left behind by a
    /// write that never reached its head is overwritten; a head never is without a
    /// resourceVersion.
    async fn put(
        &self,
        mut cm: ConfigMap,
        resource_version: Option<String>,
        overwrite: bool,
    ) -> Result<ConfigMap, kube::Error> {
        let name = cm.metadata.name.clone().unwrap_or_default();
        if let Some(rv) = resource_version {
            cm.metadata.resource_version = Some(rv);
            return self.api.replace(&name, &PostParams::default(), &cm).await;
        }
        match self.api.create(&PostParams::default(), &cm).await {
            Err(kube::Error::Api(s)) if s.code == 409 && overwrite => {
                let current = self.api.get(&name).await?;
                cm.metadata.resource_version = current.metadata.resource_version;
                self.api.replace(&name, &PostParams::default(), &cm).await
            }
            r => r,
        }
    }

    /// Makes `memory` the binding's record. Fails with a conflict when another writer replaced
    /// the head since this replica last read it.
    pub async fn store(&self, key: &RecordKey, memory: &Memory) -> Result<Written, kube::Error> {
        let cached = match self.cached(&key.uid) {
            Some(c) => c,
            None => {
                self.load(key).await?;
                self.cached(&key.uid).flatten()
            }
        };
        let mut written = Written::default();
        let foreign_text = lines(&memory.foreign);
        let mut data = BTreeMap::from([
            ("targets".to_owned(), lines(&memory.targets)),
            ("pools".to_owned(), lines(&memory.pools)),
        ]);
        // Parts are rewritten only when the foreign targets changed.
        let (generation, parts) = match &cached {
            Some(c) if c.memory.foreign == memory.foreign => (c.generation.clone(), c.parts),
            _ => {
                let counter = cached.as_ref().map_or(0, |c| {
                    c.generation
                        .split('-')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                });
                let generation = format!("{}-{:08x}", counter + 1, fastrand::u32(..));
                if foreign_text.len() <= INLINE_BYTES {
                    (generation, 0)
                } else {
                    let texts = split(&memory.foreign);
                    for (n, text) in texts.iter().enumerate() {
                        let part_data = BTreeMap::from([("foreign".to_owned(), text.clone())]);
                        written.largest_bytes = written.largest_bytes.max(data_bytes(&part_data));
                        written.objects += 1;
                        let cm = ConfigMap {
                            metadata: self.meta(key, key.part(&generation, n)),
                            data: Some(part_data),
                            ..ConfigMap::default()
                        };
                        self.put(cm, None, true).await?;
                    }
                    (generation, texts.len())
                }
            }
        };
        if parts == 0 {
            data.insert("foreign".to_owned(), foreign_text);
        }
        data.insert("generation".to_owned(), generation.clone());
        data.insert("parts".to_owned(), parts.to_string());
        written.largest_bytes = written.largest_bytes.max(data_bytes(&data));
        written.objects += 1;
        let head = ConfigMap {
            metadata: self.meta(key, key.head()),
            data: Some(data),
            ..ConfigMap::default()
        };
        let rv = cached.as_ref().map(|c| c.resource_version.clone());
        let stored = match self.put(head, rv, false).await {
            Ok(s) => s,
            Err(e) => {
                // Read afresh next time: someone else may have written. The parts written for
                // this head are nobody's: removed now, or by the next record.
                self.remember(&key.uid, None);
                if cached.as_ref().is_none_or(|c| c.generation != generation) {
                    for n in 0..parts {
                        let _ = self
                            .api
                            .delete(&key.part(&generation, n), &DeleteParams::default())
                            .await;
                    }
                }
                return Err(e);
            }
        };
        let stale_parts = cached.as_ref().is_some_and(|c| c.generation != generation);
        self.remember(
            &key.uid,
            Some(Some(Cached {
                resource_version: stored.metadata.resource_version.unwrap_or_default(),
                generation: generation.clone(),
                parts,
                memory: memory.clone(),
            })),
        );
        // Parts of older generations, and of writers whose head write failed.
        if stale_parts || cached.is_none() {
            self.delete_parts(key, Some(&generation)).await?;
        }
        Ok(written)
    }

    /// Deletes the parts of every generation but `keep`.
    async fn delete_parts(&self, key: &RecordKey, keep: Option<&str>) -> Result<(), kube::Error> {
        let params = ListParams::default().labels(&format!("{RECORD_LABEL}={}", key.uid));
        let head = key.head();
        let keep_prefix = keep.map(|g| format!("{head}-{g}-"));
        for cm in self.api.list_metadata(&params).await?.items {
            let Some(name) = cm.metadata.name else {
                continue;
            };
            if name == head || keep_prefix.as_ref().is_some_and(|p| name.starts_with(p)) {
                continue;
            }
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Deletes the record: the head first (from then on the binding answers for nothing), then
    /// every part.
    pub async fn remove(&self, key: &RecordKey) -> Result<(), kube::Error> {
        match self.api.delete(&key.head(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
        self.remember(&key.uid, Some(None));
        self.delete_parts(key, None).await
    }
}

/// A binding's journal for the engine: records go to the ledger while this replica leads; a
/// replica that lost the lease records nothing and so attaches nothing.
pub struct BindingJournal<'a> {
    pub ledger: &'a Ledger,
    pub key: RecordKey,
    pub gate: &'a WriteGate,
    /// Where the sync's progress goes, if anywhere.
    pub board: Option<&'a ProgressBoard>,
}

impl<'a> BindingJournal<'a> {
    pub fn new(ledger: &'a Ledger, key: RecordKey, gate: &'a WriteGate) -> Self {
        Self {
            ledger,
            key,
            gate,
            board: None,
        }
    }

    /// Also reports progress to `board`.
    pub fn with_progress(mut self, board: &'a ProgressBoard) -> Self {
        self.board = Some(board);
        self
    }
}

/// The latest progress of one binding's sync: kept for the status writer, and set at once in
/// the metrics.
pub struct ProgressBoard {
    latest: std::sync::Mutex<Option<SyncProgress>>,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
    binding: String,
}

impl ProgressBoard {
    pub fn new(metrics: std::sync::Arc<crate::telemetry::Metrics>, binding: String) -> Self {
        Self {
            latest: std::sync::Mutex::new(None),
            metrics,
            binding,
        }
    }

    /// The latest progress, if any came.
    pub fn latest(&self) -> Option<SyncProgress> {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `p` and sets the metrics.
    pub fn set(&self, p: &SyncProgress) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(*p);
        for (state, n) in [
            ("seen", p.seen),
            ("attached", p.attached),
            ("remaining", p.remaining),
        ] {
            self.metrics
                .sync_targets
                .get_or_create(&crate::telemetry::metrics::SyncStateLabels {
                    binding: self.binding.clone(),
                    state,
                })
                .set(n as i64);
        }
    }
}

impl Journal for BindingJournal<'_> {
    async fn record(&self, memory: &Memory) -> Result<(), JournalError> {
        if !self.gate.is_open() {
            return Err(JournalError::NotLeading);
        }
        self.ledger
            .store(&self.key, memory)
            .await
            .map_err(|e| JournalError::Write {
                place: format!("ConfigMap {}/{}", self.ledger.namespace(), self.key.head()),
                source: crate::error::Source::new(e),
            })?;
        Ok(())
    }

    fn interrupted(&self) -> bool {
        !self.gate.is_open()
    }

    fn progress(&self, progress: &SyncProgress) {
        if let Some(board) = self.board {
            board.set(progress);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_hold_every_target_once_and_stay_under_the_limit() {
        let foreign: BTreeSet<String> = (0..60_000)
            .map(|i| format!("us-east-1:{i:08x}-0000-4000-8000-000000000000"))
            .collect();
        let parts = split(&foreign);
        assert!(parts.len() > 1, "{} part(s)", parts.len());
        assert!(parts.iter().all(|p| p.len() <= PART_BYTES));
        let back: BTreeSet<String> = parts.iter().flat_map(|p| parse(Some(p))).collect();
        assert_eq!(back, foreign);
        assert_eq!(
            parts.iter().map(|p| p.lines().count()).sum::<usize>(),
            60_000
        );
    }

    #[test]
    fn an_empty_set_is_one_empty_part_and_reads_back_empty() {
        assert_eq!(split(&BTreeSet::new()), vec![String::new()]);
        assert!(parse(Some(&String::new())).is_empty());
        assert!(parse(None).is_empty());
    }
}
