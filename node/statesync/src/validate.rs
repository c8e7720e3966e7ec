//! Write-ownership validation of changes from the network.
//!
//! Every operation of a change is checked against the object it targets. Objects are located
//! through an index of every map created in the accepted history (`(counter, actor) ->`
//! a location in the schema), built from the changes themselves, so the verdict depends only on the change and
//! its causal past, never on what else a replica happens to have: every honest replica reaches
//! the same verdict, which keeps replicas convergent.
//!
//! | target | allowed |
//! | --- | --- |
//! | root | nothing (only the base change writes it) |
//! | `nodes` | creating the map at the author's own id |
//! | `nodes/<own id>/**` | schema keys with the schema's scalar types, schema sub-maps |
//! | `vms`, `quarantine` | creating a record map, filled in the same change with exactly the fields of the decision its certificate certifies |
//! | a record created by an earlier change | nothing (records are immutable) |
//!
//! Lists, text, counters and marks are refused everywhere.

use std::collections::BTreeMap;

use automerge::{
    ActorId, Change, ObjType, ScalarValue,
    legacy::{Key, ObjectId, OpType},
};
use dwcp_protocol::{NodeId, VmId};

use crate::{
    cert::{CertError, CertificateVerifier, MAX_CERTIFICATE_BYTES},
    doc::{
        ChangeSignature, ClusterDoc, actor_node, quarantine_record_fields, verify_change_sig,
        vm_record_fields,
    },
    schema::*,
};

/// Largest change accepted from the network, in bytes.
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;
/// Most operations in one change from the network.
pub const MAX_CHANGE_OPS: usize = 512;

/// Where an object lives in the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    Nodes,
    Vms,
    Quarantine,
    Node(NodeId),
    /// Sub-map of a node entry: index into `NODE_SUBMAPS`.
    NodeSub(NodeId, usize),
    Gpus(NodeId),
}

/// Why a change from the network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reject {
    /// No signature accompanied a change by a node actor.
    #[error("unsigned change")]
    Unsigned,
    /// The signature does not verify with the actor's node key.
    #[error("bad change signature")]
    BadSignature,
    /// The change was refused before (by content) and is sent again.
    #[error("change refused before")]
    AlreadyRefused,
    /// The change depends on a change that was refused.
    #[error("depends on a refused change")]
    DependsOnRejected,
    /// The change breaks the ownership or schema rules.
    #[error("invalid change: {0}")]
    Invalid(#[from] Violation),
}

impl Reject {
    /// True when the change itself is bad (as opposed to arriving without a good signature,
    /// which a relaying peer may have stripped, or carrying a certificate of a committee this
    /// node does not know yet, which it may learn later). Only content violations are
    /// remembered and poison the change's descendants.
    pub fn is_content_violation(&self) -> bool {
        !matches!(
            self,
            Reject::Unsigned
                | Reject::BadSignature
                | Reject::Invalid(Violation::Certificate(CertError::UnknownCommittee(_)))
        )
    }
}

/// An ownership or schema rule a change broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The actor id is not a node id plus incarnation.
    #[error("actor is not a node actor")]
    ForeignActor,
    /// The change is larger than [`MAX_CHANGE_BYTES`] or has more than [`MAX_CHANGE_OPS`] ops.
    #[error("change too large")]
    TooLarge,
    /// The change writes the document root.
    #[error("writes the root")]
    RootWrite,
    /// The change writes another node's entry.
    #[error("writes the entry of node {0}")]
    NotOwner(String),
    /// The change targets an object outside the schema, unknown to its causal past, or a
    /// certified record written by an earlier change (records are immutable and not indexed).
    #[error("targets an unknown object")]
    UnknownObject,
    /// A key outside the schema.
    #[error("key `{0}` is not in the schema")]
    UnknownKey(String),
    /// An operation type the schema does not use (list, text, counter, mark, wrong type).
    #[error("operation not allowed here")]
    BadOperation,
    /// A text value is too long or a value has the wrong type.
    #[error("bad value for `{0}`")]
    BadValue(String),
    /// A record without a certificate, or with one that does not verify.
    #[error("record certificate refused: {0}")]
    Certificate(CertError),
    /// A record whose fields differ from the decision its certificate certifies.
    #[error("record does not match its certificate")]
    CertificateMismatch,
}

/// What an object created in the change under validation is.
#[derive(Debug, Clone, Copy)]
enum Created {
    Indexed(Loc),
    Record(usize),
    RecordSpec(usize),
}

#[derive(Debug)]
enum RecordKind {
    Vm(VmId),
    Quarantine(NodeId),
}

#[derive(Debug)]
struct RecordDraft {
    kind: RecordKind,
    fields: BTreeMap<String, ScalarValue>,
    has_spec: bool,
}

fn key_str(k: &Key) -> Result<&str, Violation> {
    match k {
        Key::Map(s) => Ok(s.as_str()),
        Key::Seq(_) => Err(Violation::BadOperation),
    }
}

fn want_uint(key: &str, action: &OpType) -> Result<(), Violation> {
    match action {
        OpType::Put(ScalarValue::Uint(_)) => Ok(()),
        _ => Err(Violation::BadValue(key.to_string())),
    }
}

fn want_text(key: &str, action: &OpType) -> Result<(), Violation> {
    match action {
        OpType::Put(ScalarValue::Str(s)) if s.len() <= MAX_TEXT_BYTES => Ok(()),
        _ => Err(Violation::BadValue(key.to_string())),
    }
}

/// Where a map created at `key` inside an object at `parent` lives (for the index).
fn child_loc(parent: Loc, key: &str) -> Option<Loc> {
    match parent {
        Loc::Nodes => key.parse::<NodeId>().ok().map(Loc::Node),
        Loc::Node(n) => NODE_SUBMAPS
            .iter()
            .position(|(k, _)| *k == key)
            .map(|i| Loc::NodeSub(n, i)),
        Loc::NodeSub(n, i) if NODE_SUBMAPS[i].0 == "resources" && key == K_GPUS => {
            Some(Loc::Gpus(n))
        }
        _ => None,
    }
}

/// Records every map a change creates that later changes may write into (root maps, node
/// entries and their sub-maps). Used for accepted changes, our own and the base change.
pub(crate) fn index_change(index: &mut BTreeMap<(u64, ActorId), Loc>, c: &Change) {
    let ex = c.decode();
    let start = ex.start_op.get();
    for (i, op) in ex.operations.iter().enumerate() {
        if !matches!(op.action, OpType::Make(ObjType::Map)) {
            continue;
        }
        let Key::Map(k) = &op.key else { continue };
        let parent = match &op.obj {
            ObjectId::Root => match k.as_str() {
                K_NODES => {
                    index.insert((start + i as u64, ex.actor_id.clone()), Loc::Nodes);
                    continue;
                }
                K_VMS => {
                    index.insert((start + i as u64, ex.actor_id.clone()), Loc::Vms);
                    continue;
                }
                K_QUARANTINE => {
                    index.insert((start + i as u64, ex.actor_id.clone()), Loc::Quarantine);
                    continue;
                }
                _ => continue,
            },
            ObjectId::Id(id) => match index.get(&(id.counter(), id.actor().clone())) {
                Some(l) => *l,
                None => continue,
            },
        };
        if let Some(l) = child_loc(parent, k) {
            index.insert((start + i as u64, ex.actor_id.clone()), l);
        }
    }
}

/// Checks one change whose dependencies are all present. See the module docs for the rules.
pub(crate) fn check_change(
    doc: &ClusterDoc,
    c: &Change,
    sig: Option<&ChangeSignature>,
    verifier: &dyn CertificateVerifier,
) -> Result<(), Reject> {
    let h = c.hash();
    if h == doc.base {
        return Ok(());
    }
    let author = actor_node(c.actor_id()).ok_or(Violation::ForeignActor)?;
    let sig = sig.ok_or(Reject::Unsigned)?;
    if !verify_change_sig(&author, &h, sig) {
        return Err(Reject::BadSignature);
    }
    if c.raw_bytes().len() > MAX_CHANGE_BYTES || c.len() > MAX_CHANGE_OPS {
        return Err(Violation::TooLarge.into());
    }
    check_ops(doc, c, author, verifier).map_err(Reject::Invalid)
}

fn check_ops(
    doc: &ClusterDoc,
    c: &Change,
    author: NodeId,
    verifier: &dyn CertificateVerifier,
) -> Result<(), Violation> {
    let ex = c.decode();
    let start = ex.start_op.get();
    let actor = ex.actor_id.clone();
    let mut created: BTreeMap<u64, Created> = BTreeMap::new();
    let mut records: Vec<RecordDraft> = Vec::new();
    for (i, op) in ex.operations.iter().enumerate() {
        let my_counter = start + i as u64;
        if op.insert {
            return Err(Violation::BadOperation);
        }
        let key = key_str(&op.key)?;
        let target = match &op.obj {
            ObjectId::Root => return Err(Violation::RootWrite),
            ObjectId::Id(id) => {
                if id.actor() == &actor
                    && let Some(cr) = created.get(&id.counter())
                {
                    *cr
                } else if let Some(l) = doc.index.get(&(id.counter(), id.actor().clone())) {
                    Created::Indexed(*l)
                } else {
                    return Err(Violation::UnknownObject);
                }
            }
        };
        let owner = |n: NodeId| {
            if n == author {
                Ok(())
            } else {
                Err(Violation::NotOwner(n.short()))
            }
        };
        match target {
            Created::Indexed(Loc::Nodes) => {
                let n: NodeId = key
                    .parse()
                    .map_err(|_| Violation::UnknownKey(key.to_string()))?;
                owner(n)?;
                if !matches!(op.action, OpType::Make(ObjType::Map)) {
                    return Err(Violation::BadOperation);
                }
                created.insert(my_counter, Created::Indexed(Loc::Node(n)));
            }
            Created::Indexed(Loc::Node(n)) => {
                owner(n)?;
                if NODE_UINT_KEYS.contains(&key) {
                    want_uint(key, &op.action)?;
                } else if NODE_TEXT_KEYS.contains(&key) {
                    want_text(key, &op.action)?;
                } else if let Some(i) = NODE_SUBMAPS.iter().position(|(k, _)| *k == key) {
                    if !matches!(op.action, OpType::Make(ObjType::Map)) {
                        return Err(Violation::BadOperation);
                    }
                    created.insert(my_counter, Created::Indexed(Loc::NodeSub(n, i)));
                } else {
                    return Err(Violation::UnknownKey(key.to_string()));
                }
            }
            Created::Indexed(Loc::NodeSub(n, i)) => {
                owner(n)?;
                let (sub, uints) = NODE_SUBMAPS[i];
                if uints.contains(&key) {
                    want_uint(key, &op.action)?;
                } else if sub == "health" && HEALTH_TEXT_KEYS.contains(&key) {
                    match &op.action {
                        OpType::Put(ScalarValue::Str(s)) if parse_health(s).is_some() => {}
                        _ => return Err(Violation::BadValue(key.to_string())),
                    }
                } else if sub == "resources" && key == K_GPUS {
                    if !matches!(op.action, OpType::Make(ObjType::Map)) {
                        return Err(Violation::BadOperation);
                    }
                    created.insert(my_counter, Created::Indexed(Loc::Gpus(n)));
                } else {
                    return Err(Violation::UnknownKey(key.to_string()));
                }
            }
            Created::Indexed(Loc::Gpus(n)) => {
                owner(n)?;
                if key.len() > MAX_TEXT_BYTES {
                    return Err(Violation::BadValue("gpus".into()));
                }
                match &op.action {
                    OpType::Put(ScalarValue::Uint(_)) | OpType::Delete => {}
                    _ => return Err(Violation::BadOperation),
                }
            }
            Created::Indexed(Loc::Vms) | Created::Indexed(Loc::Quarantine) => {
                let kind = if matches!(target, Created::Indexed(Loc::Vms)) {
                    RecordKind::Vm(
                        key.parse()
                            .map_err(|_| Violation::UnknownKey(key.to_string()))?,
                    )
                } else {
                    RecordKind::Quarantine(
                        key.parse()
                            .map_err(|_| Violation::UnknownKey(key.to_string()))?,
                    )
                };
                if !matches!(op.action, OpType::Make(ObjType::Map)) {
                    return Err(Violation::BadOperation);
                }
                records.push(RecordDraft {
                    kind,
                    fields: BTreeMap::new(),
                    has_spec: false,
                });
                created.insert(my_counter, Created::Record(records.len() - 1));
            }
            Created::Record(r) => {
                let rec = &mut records[r];
                match (&rec.kind, key, &op.action) {
                    (RecordKind::Vm(_), "spec", OpType::Make(ObjType::Map)) if !rec.has_spec => {
                        rec.has_spec = true;
                        created.insert(my_counter, Created::RecordSpec(r));
                    }
                    (_, _, OpType::Put(v)) => {
                        if rec.fields.insert(key.to_string(), v.clone()).is_some() {
                            return Err(Violation::BadOperation);
                        }
                    }
                    _ => return Err(Violation::BadOperation),
                }
            }
            Created::RecordSpec(r) => match &op.action {
                OpType::Put(v) => {
                    if records[r]
                        .fields
                        .insert(format!("spec.{key}"), v.clone())
                        .is_some()
                    {
                        return Err(Violation::BadOperation);
                    }
                }
                _ => return Err(Violation::BadOperation),
            },
        }
    }
    for rec in records {
        let cert = match rec.fields.get("cert") {
            Some(ScalarValue::Bytes(b)) => b.clone(),
            _ => {
                return Err(Violation::Certificate(CertError::Malformed(
                    "no certificate".into(),
                )));
            }
        };
        if cert.len() > MAX_CERTIFICATE_BYTES {
            return Err(Violation::Certificate(CertError::TooLong(cert.len())));
        }
        let expected = match rec.kind {
            RecordKind::Vm(vm) => {
                let d = verifier.verify_vm(&cert).map_err(Violation::Certificate)?;
                if d.vm != vm {
                    return Err(Violation::CertificateMismatch);
                }
                vm_record_fields(&d, &cert)
            }
            RecordKind::Quarantine(n) => {
                let d = verifier
                    .verify_quarantine(&cert)
                    .map_err(Violation::Certificate)?;
                if d.node != n || d.reason.len() > MAX_TEXT_BYTES {
                    return Err(Violation::CertificateMismatch);
                }
                quarantine_record_fields(&d, &cert)
            }
        };
        if expected != rec.fields {
            return Err(Violation::CertificateMismatch);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_content_violations_are_remembered() {
        assert!(!Reject::Unsigned.is_content_violation());
        assert!(!Reject::BadSignature.is_content_violation());
        // A committee this node does not know yet (a later epoch) may become known.
        assert!(
            !Reject::Invalid(Violation::Certificate(CertError::UnknownCommittee(3)))
                .is_content_violation()
        );
        assert!(
            Reject::Invalid(Violation::Certificate(CertError::NoQuorum)).is_content_violation()
        );
        assert!(Reject::Invalid(Violation::RootWrite).is_content_violation());
        assert!(Reject::DependsOnRejected.is_content_violation());
    }
}
