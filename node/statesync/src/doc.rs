//! [`ClusterDoc`]: the Automerge document, its typed writers and readers, the actor binding,
//! change signatures, persistence, export, checksums and compaction.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::{
    ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value,
    transaction::{CommitOptions, Transactable, Transaction},
};
use dwcp_protocol::{Heartbeat, NodeAnnouncement, NodeId, NodeKey, Timestamp, VmId};
use ed25519_dalek::{Signature, Signer};
use sha2::{Digest, Sha256};

use crate::{
    cert::{CertError, CertificateVerifier, Certified, QuarantineDecision, VmDecision},
    schema::*,
    validate::{self, Loc, Reject},
};

/// Bytes of an actor id: the node id (32) followed by an incarnation number (8, big endian).
pub const ACTOR_LEN: usize = 40;
/// Domain tag signed in front of a change hash.
pub const CHANGE_SIG_DOMAIN: &[u8] = b"dwcp/v3/state-sync/change\0";
/// Most rejected change hashes remembered (to refuse their descendants).
const MAX_REJECTED: usize = 4096;
/// Most bytes of changes held while waiting for their dependencies.
const MAX_ORPHAN_BYTES: usize = 8 * 1024 * 1024;
/// Magic of the persistence container.
const SAVE_MAGIC: &[u8; 6] = b"DWSS\x00\x01";
/// Largest persisted file accepted by [`ClusterDoc::load`].
pub const MAX_SAVE_BYTES: usize = 256 * 1024 * 1024;

/// An ed25519 signature of a change hash by its author's node key.
pub type ChangeSignature = [u8; 64];

/// A local write that could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// A text field is too long for the schema.
    #[error("field `{0}` is longer than {MAX_TEXT_BYTES} bytes")]
    TooLong(&'static str),
    /// Too many GPU models.
    #[error("more than {MAX_GPU_MODELS} GPU models")]
    TooManyGpus,
    /// The announcement or heartbeat is signed by another node.
    #[error("record is signed by another node")]
    NotOurs,
    /// The certificate was refused.
    #[error("certificate refused")]
    Certificate(#[from] CertError),
    /// The certificate certifies something else than the record to write.
    #[error("certificate does not certify this record")]
    CertificateMismatch,
    /// The document refused the operation (should not happen with this schema).
    #[error("automerge: {0}")]
    Automerge(String),
}

/// A persisted document could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes are not a state-sync save file.
    #[error("not a state-sync save file")]
    BadMagic,
    /// The file is truncated or its fields are inconsistent.
    #[error("malformed save file: {0}")]
    Malformed(&'static str),
    /// The file is larger than [`MAX_SAVE_BYTES`].
    #[error("save file of {0} bytes is too large")]
    TooLarge(usize),
    /// The file belongs to another node.
    #[error("save file belongs to another node")]
    WrongNode,
    /// The file belongs to another cluster.
    #[error("save file belongs to cluster {0:?}")]
    WrongCluster(String),
    /// Automerge could not load the document.
    #[error("automerge: {0}")]
    Automerge(String),
}

/// Compaction could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompactError {
    /// The epoch is not the next one.
    #[error("epoch {got} does not follow {current}")]
    WrongEpoch {
        /// Our epoch.
        current: u64,
        /// The epoch asked for.
        got: u64,
    },
    /// Some cut heads are not in our document yet; sync first.
    #[error("{0} heads of the cut are missing")]
    MissingHeads(usize),
    /// Automerge failed.
    #[error("automerge: {0}")]
    Automerge(String),
}

/// Where a compaction cuts the history: agreed by consensus so that every node builds the
/// byte-identical snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochCut {
    /// The new epoch number (current + 1).
    pub epoch: u64,
    /// The heads whose state becomes the snapshot.
    pub heads: Vec<ChangeHash>,
    /// Nodes whose last heartbeat is older than this (ms since the Unix epoch) are dropped.
    pub departed_before_ms: u64,
}

/// What the outcome of ingesting a batch of changes from the network was.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestReport {
    /// Changes applied.
    pub applied: Vec<ChangeHash>,
    /// Changes refused, with the reason.
    pub rejected: Vec<(ChangeHash, Reject)>,
    /// Changes whose dependencies are missing, held (bounded) until they arrive.
    pub deferred: usize,
    /// Held changes evicted because the holding buffer was full.
    pub orphans_evicted: usize,
    /// Changes we already had.
    pub duplicate: usize,
}

/// Conflict counts: keys where concurrent writers left more than one value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConflictCounts {
    /// Node entries with concurrent maps (e.g. a node re-created its entry after losing its
    /// state).
    pub nodes: usize,
    /// VM ids with concurrent certified records.
    pub vms: usize,
    /// Node ids with concurrent quarantine records.
    pub quarantine: usize,
}

/// Size figures of the document.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DocStats {
    /// Changes in the history (since the last compaction).
    pub changes: usize,
    /// Operations in the history.
    pub ops: usize,
    /// Signatures held (one per non-base change).
    pub signatures: usize,
    /// Objects in the ownership index.
    pub indexed_objects: usize,
}

/// The cluster document of one node.
///
/// # Actor binding
///
/// A node's Automerge actor id is its 32-byte [`NodeId`] followed by an 8-byte incarnation
/// number (chosen when the node first creates its document, kept across restarts through
/// [`ClusterDoc::save`]), so a node that lost its disk never reuses `(actor, seq)` pairs.
/// Automerge changes are not signed, and changes are relayed by nodes other than their author,
/// so every change travels with an ed25519 signature by the actor's node key over
/// `"dwcp/v3/state-sync/change\0" || change hash`. A change without a valid signature for its
/// actor's key is never applied; the hash chains every change to its dependencies, so the
/// signature covers its whole causal context. The base change (genesis or epoch snapshot) is
/// built by every node itself, byte for byte, and needs no signature.
pub struct ClusterDoc {
    pub(crate) doc: Automerge,
    key: NodeKey,
    me: NodeId,
    me_hex: String,
    actor: ActorId,
    cluster_id: String,
    pub(crate) epoch: u64,
    pub(crate) base: ChangeHash,
    pub(crate) sigs: BTreeMap<ChangeHash, ChangeSignature>,
    rejected: BTreeSet<ChangeHash>,
    rejected_order: VecDeque<ChangeHash>,
    pub(crate) index: BTreeMap<(u64, ActorId), Loc>,
    orphans: BTreeMap<ChangeHash, (Change, Option<ChangeSignature>)>,
    orphan_order: VecDeque<ChangeHash>,
    orphan_bytes: usize,
    nodes_obj: ObjId,
    vms_obj: ObjId,
    quarantine_obj: ObjId,
    local_changes: Vec<ChangeHash>,
}

impl std::fmt::Debug for ClusterDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterDoc")
            .field("node", &self.me)
            .field("epoch", &self.epoch)
            .field("heads", &self.doc.get_heads().len())
            .finish_non_exhaustive()
    }
}

fn am(e: automerge::AutomergeError) -> WriteError {
    WriteError::Automerge(e.to_string())
}

/// The hash of a change given as bytes (`None` if they are not one): lets a downloader check a
/// snapshot against a certified hash before handing it over.
pub fn change_hash(bytes: &[u8]) -> Option<ChangeHash> {
    Change::from_bytes(bytes.to_vec()).ok().map(|c| c.hash())
}

/// The actor of a base change (genesis when `epoch` is 0, otherwise an epoch snapshot).
fn base_actor(cluster_id: &str, epoch: u64) -> ActorId {
    let mut h = Sha256::new();
    h.update(b"dwcp/v3/state-sync/base\0");
    h.update(cluster_id.as_bytes());
    h.update([0]);
    h.update(epoch.to_be_bytes());
    let d: [u8; 32] = h.finalize().into();
    ActorId::from(d)
}

/// The node id an actor id belongs to, if it is a node actor.
pub fn actor_node(actor: &ActorId) -> Option<NodeId> {
    let b = actor.to_bytes();
    if b.len() != ACTOR_LEN {
        return None;
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[..32]);
    NodeId::from_bytes(id).ok()
}

/// Signs a change hash with a node key.
pub(crate) fn sign_change(key: &NodeKey, hash: &ChangeHash) -> ChangeSignature {
    // NodeKey does not expose its signing key outside the protocol crate; rebuild it from the
    // secret bytes (a copy on the stack, dropped at the end of this call).
    let sk = ed25519_dalek::SigningKey::from_bytes(&key.secret_bytes());
    let mut m = Vec::with_capacity(CHANGE_SIG_DOMAIN.len() + 32);
    m.extend_from_slice(CHANGE_SIG_DOMAIN);
    m.extend_from_slice(&hash.0);
    sk.sign(&m).to_bytes()
}

/// Checks a change signature against a node's key.
pub(crate) fn verify_change_sig(node: &NodeId, hash: &ChangeHash, sig: &ChangeSignature) -> bool {
    let Ok(vk) = node.verifying_key() else {
        return false;
    };
    let mut m = Vec::with_capacity(CHANGE_SIG_DOMAIN.len() + 32);
    m.extend_from_slice(CHANGE_SIG_DOMAIN);
    m.extend_from_slice(&hash.0);
    vk.verify_strict(&m, &Signature::from_bytes(sig)).is_ok()
}

fn get_map(doc: &Automerge, obj: &ObjId, key: &str) -> Option<ObjId> {
    match doc.get(obj, key) {
        Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
        _ => None,
    }
}

fn get_u64(doc: &Automerge, obj: &ObjId, key: &str) -> u64 {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
            ScalarValue::Uint(n) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

fn get_str(doc: &Automerge, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn get_bytes(doc: &Automerge, obj: &ObjId, key: &str) -> Option<Vec<u8>> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
            ScalarValue::Bytes(b) => Some(b.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn get_bool(doc: &Automerge, obj: &ObjId, key: &str) -> Option<bool> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
            ScalarValue::Boolean(b) => Some(*b),
            _ => None,
        },
        _ => None,
    }
}

/// Puts a scalar only when it differs from the current value, so an unchanged heartbeat field
/// adds no operation to the history.
fn set_if_changed(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    v: ScalarValue,
) -> Result<(), WriteError> {
    if let Ok(Some((Value::Scalar(cur), _))) = tx.get(obj, key)
        && *cur == v
    {
        return Ok(());
    }
    tx.put(obj, key, v).map_err(am)
}

fn ensure_map(tx: &mut Transaction<'_>, obj: &ObjId, key: &str) -> Result<ObjId, WriteError> {
    match tx.get(obj, key) {
        Ok(Some((Value::Object(ObjType::Map), id))) => Ok(id),
        _ => tx.put_object(obj, key, ObjType::Map).map_err(am),
    }
}

fn check_text(field: &'static str, s: &str) -> Result<(), WriteError> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(WriteError::TooLong(field));
    }
    Ok(())
}

/// The scalar fields of a VM record, keyed by their path inside the record. Writers write
/// exactly these; the validator requires exactly these.
pub(crate) fn vm_record_fields(d: &VmDecision, cert: &[u8]) -> BTreeMap<String, ScalarValue> {
    let mut m = BTreeMap::new();
    m.insert(
        "decision_seq".to_string(),
        ScalarValue::Uint(d.decision_seq),
    );
    if let Some(h) = d.host {
        m.insert("host".to_string(), ScalarValue::Str(h.to_string().into()));
    }
    m.insert(
        "state".to_string(),
        ScalarValue::Str(d.state.as_str().into()),
    );
    m.insert(
        "spec.vcpus".to_string(),
        ScalarValue::Uint(u64::from(d.spec.vcpus)),
    );
    m.insert(
        "spec.memory_mib".to_string(),
        ScalarValue::Uint(d.spec.memory_mib),
    );
    m.insert(
        "spec.disk_gib".to_string(),
        ScalarValue::Uint(d.spec.disk_gib),
    );
    m.insert("cert".to_string(), ScalarValue::Bytes(cert.to_vec()));
    m
}

/// The scalar fields of a quarantine record.
pub(crate) fn quarantine_record_fields(
    d: &QuarantineDecision,
    cert: &[u8],
) -> BTreeMap<String, ScalarValue> {
    let mut m = BTreeMap::new();
    m.insert(
        "decision_seq".to_string(),
        ScalarValue::Uint(d.decision_seq),
    );
    m.insert(
        "quarantined".to_string(),
        ScalarValue::Boolean(d.quarantined),
    );
    m.insert(
        "reason".to_string(),
        ScalarValue::Str(d.reason.as_str().into()),
    );
    m.insert("cert".to_string(), ScalarValue::Bytes(cert.to_vec()));
    m
}

/// Writes a record map (VM or quarantine) from its flat field list.
fn write_record(
    tx: &mut Transaction<'_>,
    parent: &ObjId,
    key: &str,
    fields: &BTreeMap<String, ScalarValue>,
) -> Result<(), WriteError> {
    let rec = tx.put_object(parent, key, ObjType::Map).map_err(am)?;
    let mut spec: Option<ObjId> = None;
    for (k, v) in fields {
        if let Some(sub) = k.strip_prefix("spec.") {
            let s = match &spec {
                Some(s) => s.clone(),
                None => {
                    let s = tx.put_object(&rec, "spec", ObjType::Map).map_err(am)?;
                    spec = Some(s.clone());
                    s
                }
            };
            tx.put(&s, sub, v.clone()).map_err(am)?;
        } else {
            tx.put(&rec, k.as_str(), v.clone()).map_err(am)?;
        }
    }
    Ok(())
}

impl ClusterDoc {
    /// A fresh document for `cluster_id`: the genesis change (identical on every node) and
    /// nothing else. `incarnation` makes this node's actor id unique for this document's
    /// lifetime; the driver passes the wall-clock milliseconds at creation.
    pub fn new(key: NodeKey, cluster_id: &str, incarnation: u64) -> Result<Self, WriteError> {
        let (doc, base) = Self::build_base(cluster_id, 0, &ClusterView::default())?;
        Self::from_parts(key, cluster_id, incarnation, doc, base, 0)
    }

    fn from_parts(
        key: NodeKey,
        cluster_id: &str,
        incarnation: u64,
        mut doc: Automerge,
        base: ChangeHash,
        epoch: u64,
    ) -> Result<Self, WriteError> {
        let me = key.node_id();
        let mut actor = Vec::with_capacity(ACTOR_LEN);
        actor.extend_from_slice(me.as_bytes());
        actor.extend_from_slice(&incarnation.to_be_bytes());
        let actor = ActorId::from(actor);
        doc.set_actor(actor.clone());
        let missing = || WriteError::Automerge("base change lacks a root map".into());
        let nodes_obj = get_map(&doc, &ROOT, K_NODES).ok_or_else(missing)?;
        let vms_obj = get_map(&doc, &ROOT, K_VMS).ok_or_else(missing)?;
        let quarantine_obj = get_map(&doc, &ROOT, K_QUARANTINE).ok_or_else(missing)?;
        let mut this = Self {
            doc,
            key,
            me,
            me_hex: me.to_string(),
            actor,
            cluster_id: cluster_id.to_string(),
            epoch,
            base,
            sigs: BTreeMap::new(),
            rejected: BTreeSet::new(),
            rejected_order: VecDeque::new(),
            index: BTreeMap::new(),
            orphans: BTreeMap::new(),
            orphan_order: VecDeque::new(),
            orphan_bytes: 0,
            nodes_obj,
            vms_obj,
            quarantine_obj,
            local_changes: Vec::new(),
        };
        this.rebuild_index();
        Ok(this)
    }

    /// Builds the base change of an epoch: the schema's root maps and `view`, written by the
    /// epoch's fixed actor at time 0 in key order, so every node that starts from the same
    /// view produces the same bytes and the same hash.
    fn build_base(
        cluster_id: &str,
        epoch: u64,
        view: &ClusterView,
    ) -> Result<(Automerge, ChangeHash), WriteError> {
        let mut doc = Automerge::new().with_actor(base_actor(cluster_id, epoch));
        let mut tx = doc.transaction();
        tx.put(ROOT, K_SCHEMA, SCHEMA).map_err(am)?;
        tx.put(ROOT, K_CLUSTER, cluster_id).map_err(am)?;
        tx.put(ROOT, K_EPOCH, ScalarValue::Uint(epoch))
            .map_err(am)?;
        let nodes = tx.put_object(ROOT, K_NODES, ObjType::Map).map_err(am)?;
        let vms = tx.put_object(ROOT, K_VMS, ObjType::Map).map_err(am)?;
        let quarantine = tx
            .put_object(ROOT, K_QUARANTINE, ObjType::Map)
            .map_err(am)?;
        for (id, n) in &view.nodes {
            let e = tx
                .put_object(&nodes, id.to_string(), ObjType::Map)
                .map_err(am)?;
            write_node_entry(&mut tx, &e, n)?;
        }
        for (id, r) in &view.vms {
            let d = VmDecision {
                vm: *id,
                decision_seq: r.decision_seq,
                spec: r.spec,
                host: r.host,
                state: r.state,
            };
            write_record(
                &mut tx,
                &vms,
                &id.to_string(),
                &vm_record_fields(&d, &r.certificate),
            )?;
        }
        for (id, r) in &view.quarantine {
            let d = QuarantineDecision {
                node: *id,
                decision_seq: r.decision_seq,
                quarantined: r.quarantined,
                reason: r.reason.clone(),
            };
            write_record(
                &mut tx,
                &quarantine,
                &id.to_string(),
                &quarantine_record_fields(&d, &r.certificate),
            )?;
        }
        let (hash, _) = tx.commit_with(CommitOptions::default().with_time(0));
        let hash = hash.ok_or_else(|| WriteError::Automerge("empty base change".into()))?;
        Ok((doc, hash))
    }

    fn rebuild_index(&mut self) {
        self.index.clear();
        let changes = self.doc.get_changes(&[]);
        for c in &changes {
            validate::index_change(&mut self.index, c);
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The current epoch (number of compactions so far).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The hash of the base change of the current epoch.
    pub fn base_hash(&self) -> ChangeHash {
        self.base
    }

    /// Our actor id.
    pub fn actor(&self) -> &ActorId {
        &self.actor
    }

    /// The current heads, sorted.
    pub fn heads(&self) -> Vec<ChangeHash> {
        let mut h = self.doc.get_heads();
        h.sort();
        h
    }

    /// Read access to the underlying Automerge document.
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    /// Whether the document holds a change.
    pub fn has_change(&self, h: &ChangeHash) -> bool {
        self.doc.get_change_meta_by_hash(h).is_some()
    }

    /// The signature we hold for a change, if any.
    pub fn signature(&self, h: &ChangeHash) -> Option<&ChangeSignature> {
        self.sigs.get(h)
    }

    /// Hashes of local changes committed since the last call (for nudges).
    pub fn take_local_changes(&mut self) -> Vec<ChangeHash> {
        std::mem::take(&mut self.local_changes)
    }

    fn after_local_commit(&mut self, hash: ChangeHash) {
        if let Some(c) = self.doc.get_change_by_hash(&hash) {
            validate::index_change(&mut self.index, &c);
        }
        self.sigs.insert(hash, sign_change(&self.key, &hash));
        self.local_changes.push(hash);
    }

    /// Mirrors our own signed announcement into `nodes/<our id>`. Only changed fields are
    /// written. Returns the change hash, or `None` if nothing changed.
    pub fn write_announcement(
        &mut self,
        now: Timestamp,
        a: &NodeAnnouncement,
    ) -> Result<Option<ChangeHash>, WriteError> {
        check_text("region", &a.region)?;
        check_text("version", &a.version)?;
        if a.resources.gpus.len() > MAX_GPU_MODELS {
            return Err(WriteError::TooManyGpus);
        }
        for g in &a.resources.gpus {
            check_text("gpu model", &g.model)?;
        }
        let nodes = self.nodes_obj.clone();
        let me = self.me_hex.clone();
        let mut tx = self.doc.transaction();
        let e = ensure_map(&mut tx, &nodes, &me)?;
        set_if_changed(
            &mut tx,
            &e,
            "region",
            ScalarValue::Str(a.region.as_str().into()),
        )?;
        set_if_changed(
            &mut tx,
            &e,
            "version",
            ScalarValue::Str(a.version.as_str().into()),
        )?;
        set_if_changed(&mut tx, &e, "announce_seq", ScalarValue::Uint(a.seq))?;
        let r = ensure_map(&mut tx, &e, "resources")?;
        set_if_changed(
            &mut tx,
            &r,
            "vcpus",
            ScalarValue::Uint(u64::from(a.resources.vcpus)),
        )?;
        set_if_changed(
            &mut tx,
            &r,
            "memory_mib",
            ScalarValue::Uint(a.resources.memory_mib),
        )?;
        set_if_changed(
            &mut tx,
            &r,
            "disk_gib",
            ScalarValue::Uint(a.resources.disk_gib),
        )?;
        let g = ensure_map(&mut tx, &r, K_GPUS)?;
        let want: BTreeMap<&str, u64> = a
            .resources
            .gpus
            .iter()
            .map(|g| (g.model.as_str(), u64::from(g.count)))
            .collect();
        let have: Vec<String> = tx.keys(&g).collect();
        for k in have {
            if !want.contains_key(k.as_str()) {
                tx.delete(&g, k.as_str()).map_err(am)?;
            }
        }
        for (m, c) in &want {
            set_if_changed(&mut tx, &g, m, ScalarValue::Uint(*c))?;
        }
        let d = ensure_map(&mut tx, &e, "donated")?;
        set_if_changed(
            &mut tx,
            &d,
            "vcpus",
            ScalarValue::Uint(u64::from(a.donated.vcpus)),
        )?;
        set_if_changed(
            &mut tx,
            &d,
            "memory_mib",
            ScalarValue::Uint(a.donated.memory_mib),
        )?;
        set_if_changed(
            &mut tx,
            &d,
            "disk_gib",
            ScalarValue::Uint(a.donated.disk_gib),
        )?;
        set_if_changed(
            &mut tx,
            &d,
            "uplink_mbps",
            ScalarValue::Uint(u64::from(a.donated.uplink_mbps)),
        )?;
        let hash = commit_tx(tx, now);
        if let Some(h) = hash {
            self.after_local_commit(h);
        }
        Ok(hash)
    }

    /// Mirrors our own heartbeat into `nodes/<our id>`: health, sequence, uptime and issue time.
    pub fn write_heartbeat(
        &mut self,
        now: Timestamp,
        hb: &Heartbeat,
    ) -> Result<Option<ChangeHash>, WriteError> {
        let nodes = self.nodes_obj.clone();
        let me = self.me_hex.clone();
        let mut tx = self.doc.transaction();
        let e = ensure_map(&mut tx, &nodes, &me)?;
        let h = ensure_map(&mut tx, &e, "health")?;
        set_if_changed(
            &mut tx,
            &h,
            "status",
            ScalarValue::Str(health_str(hb.health.status).into()),
        )?;
        set_if_changed(
            &mut tx,
            &h,
            "cpu_load_permille",
            ScalarValue::Uint(u64::from(hb.health.cpu_load_permille)),
        )?;
        set_if_changed(
            &mut tx,
            &h,
            "memory_used_mib",
            ScalarValue::Uint(hb.health.memory_used_mib),
        )?;
        set_if_changed(
            &mut tx,
            &h,
            "vms_running",
            ScalarValue::Uint(u64::from(hb.health.vms_running)),
        )?;
        set_if_changed(
            &mut tx,
            &h,
            "peers_connected",
            ScalarValue::Uint(u64::from(hb.health.peers_connected)),
        )?;
        set_if_changed(&mut tx, &e, "heartbeat_seq", ScalarValue::Uint(hb.seq))?;
        set_if_changed(&mut tx, &e, "uptime_s", ScalarValue::Uint(hb.uptime_s))?;
        set_if_changed(
            &mut tx,
            &e,
            "last_heartbeat_ms",
            ScalarValue::Uint(hb.issued_at.as_millis()),
        )?;
        let hash = commit_tx(tx, now);
        if let Some(h) = hash {
            self.after_local_commit(h);
        }
        Ok(hash)
    }

    /// Writes a certified VM record. The certificate is checked first, and must certify exactly
    /// `c.decision`. A decision older than (or equal to) the current record is skipped
    /// (`Ok(None)`).
    pub fn write_vm(
        &mut self,
        now: Timestamp,
        c: &Certified<VmDecision>,
        verifier: &dyn CertificateVerifier,
    ) -> Result<Option<ChangeHash>, WriteError> {
        let d = verifier.verify_vm(&c.certificate)?;
        if d != c.decision {
            return Err(WriteError::CertificateMismatch);
        }
        if let Some(cur) = self.vm(&d.vm)
            && cur.decision_seq >= d.decision_seq
        {
            return Ok(None);
        }
        let vms = self.vms_obj.clone();
        let mut tx = self.doc.transaction();
        write_record(
            &mut tx,
            &vms,
            &d.vm.to_string(),
            &vm_record_fields(&d, &c.certificate),
        )?;
        let hash = commit_tx(tx, now);
        if let Some(h) = hash {
            self.after_local_commit(h);
        }
        Ok(hash)
    }

    /// Writes a certified quarantine record (same rules as [`ClusterDoc::write_vm`]).
    pub fn write_quarantine(
        &mut self,
        now: Timestamp,
        c: &Certified<QuarantineDecision>,
        verifier: &dyn CertificateVerifier,
    ) -> Result<Option<ChangeHash>, WriteError> {
        let d = verifier.verify_quarantine(&c.certificate)?;
        if d != c.decision {
            return Err(WriteError::CertificateMismatch);
        }
        check_text("reason", &d.reason)?;
        if let Some(cur) = self.quarantine(&d.node)
            && cur.decision_seq >= d.decision_seq
        {
            return Ok(None);
        }
        let q = self.quarantine_obj.clone();
        let mut tx = self.doc.transaction();
        write_record(
            &mut tx,
            &q,
            &d.node.to_string(),
            &quarantine_record_fields(&d, &c.certificate),
        )?;
        let hash = commit_tx(tx, now);
        if let Some(h) = hash {
            self.after_local_commit(h);
        }
        Ok(hash)
    }

    // ----- readers -----

    /// A node's entry.
    pub fn node(&self, id: &NodeId) -> Option<NodeEntry> {
        let e = get_map(&self.doc, &self.nodes_obj, &id.to_string())?;
        Some(read_node_entry(&self.doc, &e))
    }

    /// A VM's record: among concurrent records, the one with the highest decision sequence
    /// (ties: the larger certificate bytes), so every replica picks the same one.
    pub fn vm(&self, id: &VmId) -> Option<VmRecord> {
        let all = self.doc.get_all(&self.vms_obj, id.to_string()).ok()?;
        all.into_iter()
            .filter_map(|(v, o)| match v {
                Value::Object(ObjType::Map) => read_vm_record(&self.doc, &o),
                _ => None,
            })
            .max_by(|a, b| (a.decision_seq, &a.certificate).cmp(&(b.decision_seq, &b.certificate)))
    }

    /// A node's quarantine record (same conflict rule as [`ClusterDoc::vm`]).
    pub fn quarantine(&self, id: &NodeId) -> Option<QuarantineRecord> {
        let all = self
            .doc
            .get_all(&self.quarantine_obj, id.to_string())
            .ok()?;
        all.into_iter()
            .filter_map(|(v, o)| match v {
                Value::Object(ObjType::Map) => read_quarantine_record(&self.doc, &o),
                _ => None,
            })
            .max_by(|a, b| (a.decision_seq, &a.certificate).cmp(&(b.decision_seq, &b.certificate)))
    }

    /// Nodes whose newest quarantine record says quarantined (records are certified, so
    /// this is what consensus decided, as far as this document knows).
    pub fn quarantined_nodes(&self) -> std::collections::BTreeSet<NodeId> {
        self.doc
            .keys(&self.quarantine_obj)
            .filter_map(|k| k.parse::<NodeId>().ok())
            .filter(|id| self.quarantine(id).is_some_and(|r| r.quarantined))
            .collect()
    }

    /// Ids of all node entries.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.doc
            .keys(&self.nodes_obj)
            .filter_map(|k| k.parse().ok())
            .collect()
    }

    /// Number of VM records.
    pub fn vm_count(&self) -> usize {
        self.doc.length(&self.vms_obj)
    }

    /// The whole state as ordered maps.
    pub fn view(&self) -> ClusterView {
        let mut v = ClusterView::default();
        for k in self.doc.keys(&self.nodes_obj) {
            if let (Ok(id), Some(e)) =
                (k.parse::<NodeId>(), get_map(&self.doc, &self.nodes_obj, &k))
            {
                v.nodes.insert(id, read_node_entry(&self.doc, &e));
            }
        }
        for k in self.doc.keys(&self.vms_obj) {
            if let Ok(id) = k.parse::<VmId>()
                && let Some(r) = self.vm(&id)
            {
                v.vms.insert(id, r);
            }
        }
        for k in self.doc.keys(&self.quarantine_obj) {
            if let Ok(id) = k.parse::<NodeId>()
                && let Some(r) = self.quarantine(&id)
            {
                v.quarantine.insert(id, r);
            }
        }
        v
    }

    /// Keys with concurrent values (the CRDT conflicts readers resolve).
    pub fn conflicts(&self) -> ConflictCounts {
        let count = |obj: &ObjId| {
            self.doc
                .keys(obj)
                .filter(|k| {
                    self.doc
                        .get_all(obj, k.as_str())
                        .map(|v| v.len() > 1)
                        .unwrap_or(false)
                })
                .count()
        };
        ConflictCounts {
            nodes: count(&self.nodes_obj),
            vms: count(&self.vms_obj),
            quarantine: count(&self.quarantine_obj),
        }
    }

    /// Per-node staleness: for every node entry, `now - last_heartbeat_ms` in milliseconds
    /// (`None` if the node never wrote a heartbeat). Feeds `dwcp_state_sync_lag_seconds`.
    pub fn lag(&self, now: Timestamp) -> BTreeMap<NodeId, Option<u64>> {
        self.doc
            .keys(&self.nodes_obj)
            .filter_map(|k| {
                let id: NodeId = k.parse().ok()?;
                let e = get_map(&self.doc, &self.nodes_obj, &k)?;
                let t = get_u64(&self.doc, &e, "last_heartbeat_ms");
                Some((id, (t > 0).then(|| now.as_millis().saturating_sub(t))))
            })
            .collect()
    }

    /// SHA-256 over a canonical encoding of [`ClusterDoc::view`] plus the epoch: equal on two
    /// nodes exactly when they see the same cluster state (`state-sync verify`).
    pub fn state_checksum(&self) -> [u8; 32] {
        checksum_view(self.epoch, &self.view())
    }

    /// Size figures.
    pub fn stats(&self) -> DocStats {
        let s = self.doc.stats();
        DocStats {
            changes: s.num_changes as usize,
            ops: s.num_ops as usize,
            signatures: self.sigs.len(),
            indexed_objects: self.index.len(),
        }
    }

    // ----- ingest from the network -----

    fn remember_rejected(&mut self, h: ChangeHash) {
        if self.rejected.insert(h) {
            self.rejected_order.push_back(h);
            if self.rejected_order.len() > MAX_REJECTED
                && let Some(old) = self.rejected_order.pop_front()
            {
                self.rejected.remove(&old);
            }
        }
    }

    /// Validates changes from the network and applies those that pass. Each change needs a
    /// signature by its actor's node key (from `sigs`, or one we already hold), must only write
    /// what its author owns, and certified records must match their certificate. Changes are
    /// taken in dependency order; those whose dependencies are neither in the document nor
    /// earlier in the batch are dropped (the sync protocol asks for them again).
    pub fn ingest(
        &mut self,
        changes: Vec<Change>,
        sigs: &BTreeMap<ChangeHash, ChangeSignature>,
        verifier: &dyn CertificateVerifier,
    ) -> Result<IngestReport, WriteError> {
        let mut report = IngestReport::default();
        let mut pending: Vec<Change> = Vec::with_capacity(changes.len() + self.orphans.len());
        let mut seen = BTreeSet::new();
        let mut sigs = sigs.clone();
        // Changes held from earlier batches get another chance now.
        for (h, (c, s)) in std::mem::take(&mut self.orphans) {
            if let Some(s) = s {
                sigs.entry(h).or_insert(s);
            }
            seen.insert(h);
            pending.push(c);
        }
        self.orphan_order.clear();
        self.orphan_bytes = 0;
        for c in changes {
            let h = c.hash();
            if self.has_change(&h) || !seen.insert(h) {
                report.duplicate += 1;
            } else {
                pending.push(c);
            }
        }
        let mut accepted: Vec<Change> = Vec::new();
        let mut accepted_set: BTreeSet<ChangeHash> = BTreeSet::new();
        loop {
            let mut progress = false;
            let mut rest = Vec::new();
            for c in pending {
                let h = c.hash();
                if self.rejected.contains(&h) {
                    report.rejected.push((h, Reject::AlreadyRefused));
                    progress = true;
                    continue;
                }
                if c.deps().iter().any(|d| self.rejected.contains(d)) {
                    self.remember_rejected(h);
                    report.rejected.push((h, Reject::DependsOnRejected));
                    progress = true;
                    continue;
                }
                if !c
                    .deps()
                    .iter()
                    .all(|d| accepted_set.contains(d) || self.has_change(d))
                {
                    rest.push(c);
                    continue;
                }
                progress = true;
                let sig = sigs.get(&h).or_else(|| self.sigs.get(&h)).copied();
                match validate::check_change(self, &c, sig.as_ref(), verifier) {
                    Ok(()) => {
                        validate::index_change(&mut self.index, &c);
                        if let Some(s) = sig {
                            self.sigs.insert(h, s);
                        }
                        accepted_set.insert(h);
                        accepted.push(c);
                    }
                    Err(r) => {
                        // A missing or bad signature may be a relay's fault: the genuine change
                        // can still arrive signed, so only content violations are remembered.
                        if r.is_content_violation() {
                            self.remember_rejected(h);
                        }
                        report.rejected.push((h, r));
                    }
                }
            }
            pending = rest;
            if !progress || pending.is_empty() {
                break;
            }
        }
        report.deferred = pending.len();
        for c in pending {
            let h = c.hash();
            let s = sigs.get(&h).copied();
            self.orphan_bytes += c.raw_bytes().len();
            self.orphan_order.push_back(h);
            self.orphans.insert(h, (c, s));
        }
        while self.orphan_bytes > MAX_ORPHAN_BYTES {
            let Some(old) = self.orphan_order.pop_front() else {
                break;
            };
            if let Some((c, _)) = self.orphans.remove(&old) {
                self.orphan_bytes -= c.raw_bytes().len();
                report.orphans_evicted += 1;
            }
        }
        report.applied = accepted.iter().map(Change::hash).collect();
        if !accepted.is_empty() {
            self.doc.apply_changes(accepted).map_err(am)?;
        }
        Ok(report)
    }

    /// Dependencies of held changes that we have neither in the document nor held: the sync
    /// session asks the peer for them (`need`).
    pub fn missing_orphan_deps(&self) -> Vec<ChangeHash> {
        let mut out: BTreeSet<ChangeHash> = BTreeSet::new();
        for (c, _) in self.orphans.values() {
            for d in c.deps() {
                if !self.orphans.contains_key(d) && !self.has_change(d) {
                    out.insert(*d);
                }
            }
        }
        out.into_iter().take(256).collect()
    }

    /// Number of changes held while waiting for their dependencies.
    pub fn orphan_count(&self) -> usize {
        self.orphans.len()
    }

    // ----- persistence and export -----

    /// Persistent bytes: a small header (actor, cluster, epoch, base), the change signatures,
    /// then the Automerge document. The driver writes them to sled; [`ClusterDoc::load`]
    /// reads them back.
    pub fn save(&self) -> Vec<u8> {
        let doc = self.doc.save();
        let mut out = Vec::with_capacity(doc.len() + self.sigs.len() * 96 + 128);
        out.extend_from_slice(SAVE_MAGIC);
        out.extend_from_slice(self.actor.to_bytes());
        let cid = self.cluster_id.as_bytes();
        out.extend_from_slice(&(cid.len() as u32).to_be_bytes());
        out.extend_from_slice(cid);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.base.0);
        out.extend_from_slice(&(self.sigs.len() as u64).to_be_bytes());
        for (h, s) in &self.sigs {
            out.extend_from_slice(&h.0);
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&doc);
        out
    }

    /// Loads bytes written by [`ClusterDoc::save`] for this node's key.
    pub fn load(key: NodeKey, cluster_id: &str, bytes: &[u8]) -> Result<Self, LoadError> {
        if bytes.len() > MAX_SAVE_BYTES {
            return Err(LoadError::TooLarge(bytes.len()));
        }
        if !bytes.starts_with(SAVE_MAGIC) {
            return Err(LoadError::BadMagic);
        }
        let mut r = Reader(&bytes[SAVE_MAGIC.len()..]);
        let actor = r.take(ACTOR_LEN)?;
        if actor[..32] != key.node_id().as_bytes()[..] {
            return Err(LoadError::WrongNode);
        }
        let mut inc = [0u8; 8];
        inc.copy_from_slice(&actor[32..]);
        let incarnation = u64::from_be_bytes(inc);
        let cid_len = r.u32()? as usize;
        let cid = std::str::from_utf8(r.take(cid_len)?)
            .map_err(|_| LoadError::Malformed("cluster id"))?;
        if cid != cluster_id {
            return Err(LoadError::WrongCluster(cid.to_string()));
        }
        let epoch = r.u64()?;
        let mut base = [0u8; 32];
        base.copy_from_slice(r.take(32)?);
        let n = r.u64()?;
        if n.saturating_mul(96) > r.0.len() as u64 {
            return Err(LoadError::Malformed("signature count"));
        }
        let mut sigs = BTreeMap::new();
        for _ in 0..n {
            let mut h = [0u8; 32];
            h.copy_from_slice(r.take(32)?);
            let mut s = [0u8; 64];
            s.copy_from_slice(r.take(64)?);
            sigs.insert(ChangeHash(h), s);
        }
        let doc = Automerge::load(r.0).map_err(|e| LoadError::Automerge(e.to_string()))?;
        let base = ChangeHash(base);
        if doc.get_change_meta_by_hash(&base).is_none() {
            return Err(LoadError::Malformed("base change missing"));
        }
        let mut this = Self::from_parts(key, cluster_id, incarnation, doc, base, epoch)
            .map_err(|e| LoadError::Automerge(e.to_string()))?;
        this.sigs = sigs;
        Ok(this)
    }

    /// The document as plain Automerge bytes (no signatures, no header): any Automerge
    /// implementation can load it (`state-sync export`).
    pub fn export(&self) -> Vec<u8> {
        self.doc.save()
    }

    // ----- compaction -----

    /// Replaces the history with a snapshot of the state at `cut.heads`, dropping nodes whose
    /// last heartbeat is older than `cut.departed_before_ms`, finished VMs (stopped, failed)
    /// and released quarantine records. Every node that compacts at the same cut builds the
    /// same base change (same bytes, same hash), so their documents stay one document. Our own
    /// entry and any certified record newer than the cut are then re-written on top of it, so
    /// nothing this node knows is lost; other nodes carry their own entries forward when they
    /// compact.
    pub fn compact(
        &mut self,
        now: Timestamp,
        cut: &EpochCut,
        verifier: &dyn CertificateVerifier,
    ) -> Result<ChangeHash, CompactError> {
        let (at_cut, snap) = self.snapshot_at(cut)?;
        let (doc, base) = Self::build_base(&self.cluster_id, cut.epoch, &snap)
            .map_err(|e| CompactError::Automerge(e.to_string()))?;
        self.replace(now, doc, base, cut.epoch, &at_cut, verifier)?;
        Ok(base)
    }

    /// The hash of the base change a compaction at `cut` builds, without compacting: what a
    /// proposer puts into the cut and an endorser checks, so that a node that cannot build
    /// the snapshot itself can take it from a peer ([`ClusterDoc::adopt_base`]).
    pub fn cut_base(&self, cut: &EpochCut) -> Result<ChangeHash, CompactError> {
        let (_, snap) = self.snapshot_at(cut)?;
        Self::build_base(&self.cluster_id, cut.epoch, &snap)
            .map(|(_, h)| h)
            .map_err(|e| CompactError::Automerge(e.to_string()))
    }

    /// The state at the cut's heads, and the snapshot built from it.
    fn snapshot_at(&self, cut: &EpochCut) -> Result<(ClusterView, ClusterView), CompactError> {
        if cut.epoch != self.epoch + 1 {
            return Err(CompactError::WrongEpoch {
                current: self.epoch,
                got: cut.epoch,
            });
        }
        let missing = cut.heads.iter().filter(|h| !self.has_change(h)).count();
        if missing > 0 {
            return Err(CompactError::MissingHeads(missing));
        }
        let at_cut = {
            let fork = self
                .doc
                .fork_at(&cut.heads)
                .map_err(|e| CompactError::Automerge(e.to_string()))?;
            let tmp = ClusterDocView::new(&fork)
                .ok_or_else(|| CompactError::Automerge("fork lacks root maps".into()))?;
            tmp.view()
        };
        let mut snap = at_cut.clone();
        snap.nodes
            .retain(|_, n| n.last_heartbeat_ms >= cut.departed_before_ms);
        snap.vms.retain(|_, r| !r.state.is_finished());
        snap.quarantine.retain(|_, r| r.quarantined);
        // The snapshot's records go without their certificates: the cut certifies the
        // snapshot as a whole (f+1 members computed its hash from records they had verified),
        // which keeps a compacted document's size independent of the committee's.
        for r in snap.vms.values_mut() {
            r.certificate.clear();
        }
        for r in snap.quarantine.values_mut() {
            r.certificate.clear();
        }
        Ok((at_cut, snap))
    }

    /// The raw bytes of this epoch's base change, for a node that cannot build it itself.
    pub fn base_change_bytes(&self) -> Option<Vec<u8>> {
        self.doc
            .get_change_by_hash(&self.base)
            .map(|c| c.raw_bytes().to_vec())
    }

    /// Replaces the document by the snapshot of `epoch` received as its base change's bytes,
    /// which must hash to `base` (the hash a committed cut certifies) and be written by that
    /// epoch's base actor. For a node that fell behind a compaction and cannot get the cut's
    /// heads (peers on the new epoch no longer sync the old one). As in
    /// [`ClusterDoc::compact`], our own entry and newer certified VM records are carried over.
    pub fn adopt_base(
        &mut self,
        now: Timestamp,
        epoch: u64,
        bytes: &[u8],
        base: ChangeHash,
        verifier: &dyn CertificateVerifier,
    ) -> Result<(), CompactError> {
        if epoch <= self.epoch {
            return Err(CompactError::WrongEpoch {
                current: self.epoch,
                got: epoch,
            });
        }
        let bad = |s: &str| CompactError::Automerge(s.to_owned());
        let change = Change::from_bytes(bytes.to_vec()).map_err(|e| bad(&e.to_string()))?;
        if change.hash() != base {
            return Err(bad("the snapshot does not hash to the certified base"));
        }
        if change.actor_id() != &base_actor(&self.cluster_id, epoch) || !change.deps().is_empty() {
            return Err(bad("the snapshot is not a base change of this epoch"));
        }
        let mut doc = Automerge::new();
        doc.apply_changes([change])
            .map_err(|e| bad(&e.to_string()))?;
        let snap = ClusterDocView::new(&doc)
            .ok_or_else(|| bad("the snapshot lacks the root maps"))?
            .view();
        self.replace(now, doc, base, epoch, &snap, verifier)
    }

    /// Makes `doc` (a base change of `epoch`) this document, then re-writes our own entry and
    /// the certified VM records newer than `at_cut` on top of it.
    fn replace(
        &mut self,
        now: Timestamp,
        doc: Automerge,
        base: ChangeHash,
        epoch: u64,
        at_cut: &ClusterView,
        verifier: &dyn CertificateVerifier,
    ) -> Result<(), CompactError> {
        let current = self.view();
        let incarnation = {
            let b = self.actor.to_bytes();
            let mut inc = [0u8; 8];
            inc.copy_from_slice(&b[32..ACTOR_LEN]);
            u64::from_be_bytes(inc)
        };
        let fresh = Self::from_parts(
            self.key.clone(),
            &self.cluster_id,
            incarnation,
            doc,
            base,
            epoch,
        )
        .map_err(|e| CompactError::Automerge(e.to_string()))?;
        *self = fresh;
        let in_base = self.view();
        // Carry forward what happened after the cut and is ours to write.
        if let Some(mine) = current.nodes.get(&self.me)
            && in_base.nodes.get(&self.me) != Some(mine)
        {
            self.rewrite_own_entry(now, mine)
                .map_err(|e| CompactError::Automerge(e.to_string()))?;
        }
        for (id, r) in &current.vms {
            let newer = at_cut
                .vms
                .get(id)
                .is_none_or(|o| o.decision_seq < r.decision_seq);
            if newer && !r.state.is_finished() {
                let c = Certified {
                    decision: VmDecision {
                        vm: *id,
                        decision_seq: r.decision_seq,
                        spec: r.spec,
                        host: r.host,
                        state: r.state,
                    },
                    certificate: r.certificate.clone(),
                };
                // A record whose certificate no longer verifies is simply not carried.
                let _ = self.write_vm(now, &c, verifier);
            }
        }
        Ok(())
    }

    fn rewrite_own_entry(&mut self, now: Timestamp, n: &NodeEntry) -> Result<(), WriteError> {
        let nodes = self.nodes_obj.clone();
        let me = self.me_hex.clone();
        let mut tx = self.doc.transaction();
        let e = ensure_map(&mut tx, &nodes, &me)?;
        write_node_entry(&mut tx, &e, n)?;
        if let Some(h) = commit_tx(tx, now) {
            self.after_local_commit(h);
        }
        Ok(())
    }
}

fn commit_tx(tx: Transaction<'_>, now: Timestamp) -> Option<ChangeHash> {
    let t = i64::try_from(now.as_millis()).unwrap_or(i64::MAX);
    let (hash, _) = tx.commit_with(CommitOptions::default().with_time(t));
    hash
}

/// Writes every field of a node entry (used by snapshots and by carrying an entry forward).
fn write_node_entry(tx: &mut Transaction<'_>, e: &ObjId, n: &NodeEntry) -> Result<(), WriteError> {
    set_if_changed(tx, e, "region", ScalarValue::Str(n.region.as_str().into()))?;
    set_if_changed(
        tx,
        e,
        "version",
        ScalarValue::Str(n.version.as_str().into()),
    )?;
    set_if_changed(tx, e, "announce_seq", ScalarValue::Uint(n.announce_seq))?;
    let r = ensure_map(tx, e, "resources")?;
    for (k, v) in ["vcpus", "memory_mib", "disk_gib"].iter().zip(n.resources) {
        set_if_changed(tx, &r, k, ScalarValue::Uint(v))?;
    }
    let g = ensure_map(tx, &r, K_GPUS)?;
    for (m, c) in &n.gpus {
        set_if_changed(tx, &g, m, ScalarValue::Uint(*c))?;
    }
    let d = ensure_map(tx, e, "donated")?;
    for (k, v) in ["vcpus", "memory_mib", "disk_gib", "uplink_mbps"]
        .iter()
        .zip(n.donated)
    {
        set_if_changed(tx, &d, k, ScalarValue::Uint(v))?;
    }
    let h = ensure_map(tx, e, "health")?;
    if !n.health_status.is_empty() {
        set_if_changed(
            tx,
            &h,
            "status",
            ScalarValue::Str(n.health_status.as_str().into()),
        )?;
    }
    for (k, v) in [
        "cpu_load_permille",
        "memory_used_mib",
        "vms_running",
        "peers_connected",
    ]
    .iter()
    .zip(n.health)
    {
        set_if_changed(tx, &h, k, ScalarValue::Uint(v))?;
    }
    set_if_changed(tx, e, "heartbeat_seq", ScalarValue::Uint(n.heartbeat_seq))?;
    set_if_changed(tx, e, "uptime_s", ScalarValue::Uint(n.uptime_s))?;
    set_if_changed(
        tx,
        e,
        "last_heartbeat_ms",
        ScalarValue::Uint(n.last_heartbeat_ms),
    )?;
    Ok(())
}

fn read_node_entry(doc: &Automerge, e: &ObjId) -> NodeEntry {
    let mut n = NodeEntry {
        region: get_str(doc, e, "region").unwrap_or_default(),
        version: get_str(doc, e, "version").unwrap_or_default(),
        announce_seq: get_u64(doc, e, "announce_seq"),
        heartbeat_seq: get_u64(doc, e, "heartbeat_seq"),
        uptime_s: get_u64(doc, e, "uptime_s"),
        last_heartbeat_ms: get_u64(doc, e, "last_heartbeat_ms"),
        ..NodeEntry::default()
    };
    if let Some(r) = get_map(doc, e, "resources") {
        for (i, k) in ["vcpus", "memory_mib", "disk_gib"].iter().enumerate() {
            n.resources[i] = get_u64(doc, &r, k);
        }
        if let Some(g) = get_map(doc, &r, K_GPUS) {
            for k in doc.keys(&g) {
                let c = get_u64(doc, &g, &k);
                n.gpus.insert(k, c);
            }
        }
    }
    if let Some(d) = get_map(doc, e, "donated") {
        for (i, k) in ["vcpus", "memory_mib", "disk_gib", "uplink_mbps"]
            .iter()
            .enumerate()
        {
            n.donated[i] = get_u64(doc, &d, k);
        }
    }
    if let Some(h) = get_map(doc, e, "health") {
        n.health_status = get_str(doc, &h, "status").unwrap_or_default();
        for (i, k) in [
            "cpu_load_permille",
            "memory_used_mib",
            "vms_running",
            "peers_connected",
        ]
        .iter()
        .enumerate()
        {
            n.health[i] = get_u64(doc, &h, k);
        }
    }
    n
}

fn read_vm_record(doc: &Automerge, o: &ObjId) -> Option<VmRecord> {
    let spec = get_map(doc, o, "spec")?;
    Some(VmRecord {
        decision_seq: get_u64(doc, o, "decision_seq"),
        spec: VmSpec {
            vcpus: u32::try_from(get_u64(doc, &spec, "vcpus")).unwrap_or(u32::MAX),
            memory_mib: get_u64(doc, &spec, "memory_mib"),
            disk_gib: get_u64(doc, &spec, "disk_gib"),
        },
        host: get_str(doc, o, "host").and_then(|h| h.parse().ok()),
        state: VmState::parse(&get_str(doc, o, "state")?)?,
        certificate: get_bytes(doc, o, "cert")?,
    })
}

fn read_quarantine_record(doc: &Automerge, o: &ObjId) -> Option<QuarantineRecord> {
    Some(QuarantineRecord {
        decision_seq: get_u64(doc, o, "decision_seq"),
        quarantined: get_bool(doc, o, "quarantined")?,
        reason: get_str(doc, o, "reason").unwrap_or_default(),
        certificate: get_bytes(doc, o, "cert")?,
    })
}

/// Read-only typed access to any document with our schema (used on forks).
struct ClusterDocView<'a> {
    doc: &'a Automerge,
    nodes: ObjId,
    vms: ObjId,
    quarantine: ObjId,
}

impl<'a> ClusterDocView<'a> {
    fn new(doc: &'a Automerge) -> Option<Self> {
        Some(Self {
            doc,
            nodes: get_map(doc, &ROOT, K_NODES)?,
            vms: get_map(doc, &ROOT, K_VMS)?,
            quarantine: get_map(doc, &ROOT, K_QUARANTINE)?,
        })
    }

    fn best<T, F: Fn(&Automerge, &ObjId) -> Option<T>>(
        &self,
        obj: &ObjId,
        key: &str,
        read: F,
        rank: impl Fn(&T) -> (u64, Vec<u8>),
    ) -> Option<T> {
        self.doc
            .get_all(obj, key)
            .ok()?
            .into_iter()
            .filter_map(|(v, o)| match v {
                Value::Object(ObjType::Map) => read(self.doc, &o),
                _ => None,
            })
            .max_by_key(|r| rank(r))
    }

    fn view(&self) -> ClusterView {
        let mut v = ClusterView::default();
        for k in self.doc.keys(&self.nodes) {
            if let (Ok(id), Some(e)) = (k.parse::<NodeId>(), get_map(self.doc, &self.nodes, &k)) {
                v.nodes.insert(id, read_node_entry(self.doc, &e));
            }
        }
        for k in self.doc.keys(&self.vms) {
            if let Ok(id) = k.parse::<VmId>()
                && let Some(r) = self.best(&self.vms, &k, read_vm_record, |r: &VmRecord| {
                    (r.decision_seq, r.certificate.clone())
                })
            {
                v.vms.insert(id, r);
            }
        }
        for k in self.doc.keys(&self.quarantine) {
            if let Ok(id) = k.parse::<NodeId>()
                && let Some(r) = self.best(
                    &self.quarantine,
                    &k,
                    read_quarantine_record,
                    |r: &QuarantineRecord| (r.decision_seq, r.certificate.clone()),
                )
            {
                v.quarantine.insert(id, r);
            }
        }
        v
    }
}

/// Reads the cluster state out of plain Automerge bytes as [`ClusterDoc::export`] writes them
/// (`dwcp-cli state-sync export`), without signatures or ownership checks: for tools and
/// tests that inspect an exported document. Certificates inside are returned as stored; check
/// them with a [`CertificateVerifier`].
pub fn read_export(bytes: &[u8]) -> Result<ClusterView, LoadError> {
    if bytes.len() > MAX_SAVE_BYTES {
        return Err(LoadError::TooLarge(bytes.len()));
    }
    let doc = Automerge::load(bytes).map_err(|e| LoadError::Automerge(e.to_string()))?;
    let v = ClusterDocView::new(&doc).ok_or(LoadError::Malformed("root maps missing"))?;
    Ok(v.view())
}

/// Canonical checksum of a view (length-prefixed fields in key order).
pub fn checksum_view(epoch: u64, v: &ClusterView) -> [u8; 32] {
    let mut h = Sha256::new();
    let s = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    h.update(b"dwcp/v3/state-sync/checksum\0");
    h.update(epoch.to_be_bytes());
    h.update((v.nodes.len() as u64).to_be_bytes());
    for (id, n) in &v.nodes {
        h.update(id.as_bytes());
        s(&mut h, n.region.as_bytes());
        s(&mut h, n.version.as_bytes());
        s(&mut h, n.health_status.as_bytes());
        for x in [
            n.announce_seq,
            n.heartbeat_seq,
            n.uptime_s,
            n.last_heartbeat_ms,
        ]
        .iter()
        .chain(&n.resources)
        .chain(&n.donated)
        .chain(&n.health)
        {
            h.update(x.to_be_bytes());
        }
        h.update((n.gpus.len() as u64).to_be_bytes());
        for (m, c) in &n.gpus {
            s(&mut h, m.as_bytes());
            h.update(c.to_be_bytes());
        }
    }
    h.update((v.vms.len() as u64).to_be_bytes());
    for (id, r) in &v.vms {
        h.update(id.as_bytes());
        h.update(r.decision_seq.to_be_bytes());
        h.update(u64::from(r.spec.vcpus).to_be_bytes());
        h.update(r.spec.memory_mib.to_be_bytes());
        h.update(r.spec.disk_gib.to_be_bytes());
        s(
            &mut h,
            r.host.map(|n| *n.as_bytes()).unwrap_or([0; 32]).as_slice(),
        );
        s(&mut h, r.state.as_str().as_bytes());
        s(&mut h, &r.certificate);
    }
    h.update((v.quarantine.len() as u64).to_be_bytes());
    for (id, r) in &v.quarantine {
        h.update(id.as_bytes());
        h.update(r.decision_seq.to_be_bytes());
        h.update([u8::from(r.quarantined)]);
        s(&mut h, r.reason.as_bytes());
        s(&mut h, &r.certificate);
    }
    h.finalize().into()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        if self.0.len() < n {
            return Err(LoadError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, LoadError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, LoadError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

/// Byzantine behaviour for tests and the simulator: raw writes that bypass the typed API.
#[cfg(any(test, feature = "test-utils"))]
impl ClusterDoc {
    /// Commits arbitrary operations (`f` gets the transaction and the `nodes`, `vms` maps),
    /// optionally under a forged actor id, and signs the change with this node's key, as a
    /// Byzantine node would. The change is then offered to peers like any other.
    pub fn fake_raw_write(
        &mut self,
        now: Timestamp,
        forged_actor: Option<ActorId>,
        f: impl FnOnce(&mut Transaction<'_>, &ObjId, &ObjId) -> Result<(), automerge::AutomergeError>,
    ) -> Option<ChangeHash> {
        let nodes = self.nodes_obj.clone();
        let vms = self.vms_obj.clone();
        if let Some(a) = &forged_actor {
            self.doc.set_actor(a.clone());
        }
        let hash = {
            let mut tx = self.doc.transaction();
            if f(&mut tx, &nodes, &vms).is_ok() {
                commit_tx(tx, now)
            } else {
                None
            }
        };
        if forged_actor.is_some() {
            self.doc.set_actor(self.actor.clone());
        }
        let h = hash?;
        if let Some(c) = self.doc.get_change_by_hash(&h) {
            validate::index_change(&mut self.index, &c);
        }
        self.sigs.insert(h, sign_change(&self.key, &h));
        Some(h)
    }
}
