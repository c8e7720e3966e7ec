//! Fakes for tests and the simulator. Not for production: consensus provides the real
//! [`CertificateVerifier`].
//!
//! [`FakeCommittee`] stands in for a PBFT quorum: one ed25519 key signs decisions, and
//! [`FakeCertificateVerifier`] accepts exactly the certificates that key signed. The
//! certificate format is `kind (u8) | decision bytes | signature [64]`.

use dwcp_protocol::{NodeId, NodeKey, VmId};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::{
    cert::{CertError, CertificateVerifier, Certified, QuarantineDecision, VmDecision},
    schema::{VmSpec, VmState},
};

const K_VM: u8 = 1;
const K_QUARANTINE: u8 = 2;
const DOMAIN: &[u8] = b"dwcp/test/fake-committee\0";

/// A fake quorum that signs decisions with one key (tests and simulator only).
#[derive(Debug, Clone)]
pub struct FakeCommittee {
    key: SigningKey,
    /// Certificates are padded to this many bytes (0: no padding), with incompressible
    /// bytes, so that benchmarks can stand in for real certificates of a given size.
    pad_to: usize,
}

/// Verifies certificates made by a [`FakeCommittee`] (tests and simulator only).
#[derive(Debug, Clone)]
pub struct FakeCertificateVerifier {
    key: VerifyingKey,
}

fn states() -> [VmState; 6] {
    [
        VmState::Pending,
        VmState::Placed,
        VmState::Running,
        VmState::Migrating,
        VmState::Stopped,
        VmState::Failed,
    ]
}

fn encode_vm(d: &VmDecision) -> Vec<u8> {
    let mut b = vec![K_VM];
    b.extend_from_slice(d.vm.as_bytes());
    b.extend_from_slice(&d.decision_seq.to_be_bytes());
    b.extend_from_slice(&d.spec.vcpus.to_be_bytes());
    b.extend_from_slice(&d.spec.memory_mib.to_be_bytes());
    b.extend_from_slice(&d.spec.disk_gib.to_be_bytes());
    match d.host {
        Some(h) => {
            b.push(1);
            b.extend_from_slice(h.as_bytes());
        }
        None => b.push(0),
    }
    b.push(states().iter().position(|s| *s == d.state).unwrap_or(0) as u8);
    b
}

fn encode_quarantine(d: &QuarantineDecision) -> Vec<u8> {
    let mut b = vec![K_QUARANTINE];
    b.extend_from_slice(d.node.as_bytes());
    b.extend_from_slice(&d.decision_seq.to_be_bytes());
    b.push(u8::from(d.quarantined));
    let r = d.reason.as_bytes();
    b.push(r.len().min(255) as u8);
    b.extend_from_slice(&r[..r.len().min(255)]);
    b
}

impl FakeCommittee {
    /// A committee with a key derived from `seed`.
    pub fn new(seed: u8) -> Self {
        Self {
            key: SigningKey::from_bytes(&[seed; 32]),
            pad_to: 0,
        }
    }

    /// A committee whose certificates are `bytes` long (padded after the decision with
    /// pseudo-random bytes, which the verifier ignores): the size of the real PBFT
    /// certificates (about 1 KB at n = 4, 4 KB at n = 31) for memory benchmarks.
    pub fn with_certificate_bytes(seed: u8, bytes: usize) -> Self {
        Self {
            pad_to: bytes,
            ..Self::new(seed)
        }
    }

    /// The matching verifier.
    pub fn verifier(&self) -> FakeCertificateVerifier {
        FakeCertificateVerifier {
            key: self.key.verifying_key(),
        }
    }

    fn seal(&self, mut body: Vec<u8>) -> Vec<u8> {
        let want = self.pad_to.saturating_sub(64);
        let mut block = {
            use sha2::Digest as _;
            sha2::Sha256::digest(&body)
        };
        while body.len() < want {
            use sha2::Digest as _;
            let take = (want - body.len()).min(block.len());
            body.extend_from_slice(&block[..take]);
            block = sha2::Sha256::digest(block);
        }
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(&body);
        body.extend_from_slice(&self.key.sign(&m).to_bytes());
        body
    }

    /// Certifies a VM decision.
    pub fn certify_vm(&self, d: VmDecision) -> Certified<VmDecision> {
        let certificate = self.seal(encode_vm(&d));
        Certified {
            decision: d,
            certificate,
        }
    }

    /// Certifies a quarantine decision.
    pub fn certify_quarantine(&self, d: QuarantineDecision) -> Certified<QuarantineDecision> {
        let certificate = self.seal(encode_quarantine(&d));
        Certified {
            decision: d,
            certificate,
        }
    }
}

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CertError> {
        if self.0.len() < n {
            return Err(CertError::Malformed("truncated".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], CertError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

impl FakeCertificateVerifier {
    fn open<'a>(&self, cert: &'a [u8], kind: u8) -> Result<&'a [u8], CertError> {
        if cert.len() > crate::cert::MAX_CERTIFICATE_BYTES {
            return Err(CertError::TooLong(cert.len()));
        }
        if cert.len() < 65 {
            return Err(CertError::Malformed("short".into()));
        }
        let (body, sig) = cert.split_at(cert.len() - 64);
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(body);
        let sig: [u8; 64] = sig.try_into().map_err(|_| CertError::NoQuorum)?;
        self.key
            .verify_strict(&m, &Signature::from_bytes(&sig))
            .map_err(|_| CertError::NoQuorum)?;
        if body[0] != kind {
            return Err(CertError::WrongKind);
        }
        Ok(&body[1..])
    }
}

impl CertificateVerifier for FakeCertificateVerifier {
    fn verify_vm(&self, certificate: &[u8]) -> Result<VmDecision, CertError> {
        let mut r = Rd(self.open(certificate, K_VM)?);
        let vm = VmId::from_bytes(r.arr()?);
        let decision_seq = u64::from_be_bytes(r.arr()?);
        let vcpus = u32::from_be_bytes(r.arr()?);
        let memory_mib = u64::from_be_bytes(r.arr()?);
        let disk_gib = u64::from_be_bytes(r.arr()?);
        let host = match r.arr::<1>()?[0] {
            0 => None,
            _ => Some(
                NodeId::from_bytes(r.arr()?).map_err(|e| CertError::Malformed(e.to_string()))?,
            ),
        };
        let state = *states()
            .get(usize::from(r.arr::<1>()?[0]))
            .ok_or_else(|| CertError::Malformed("state".into()))?;
        Ok(VmDecision {
            vm,
            decision_seq,
            spec: VmSpec {
                vcpus,
                memory_mib,
                disk_gib,
            },
            host,
            state,
        })
    }

    fn verify_quarantine(&self, certificate: &[u8]) -> Result<QuarantineDecision, CertError> {
        let mut r = Rd(self.open(certificate, K_QUARANTINE)?);
        let node = NodeId::from_bytes(r.arr()?).map_err(|e| CertError::Malformed(e.to_string()))?;
        let decision_seq = u64::from_be_bytes(r.arr()?);
        let quarantined = r.arr::<1>()?[0] != 0;
        let n = usize::from(r.arr::<1>()?[0]);
        let reason = String::from_utf8(r.take(n)?.to_vec())
            .map_err(|_| CertError::Malformed("reason".into()))?;
        Ok(QuarantineDecision {
            node,
            decision_seq,
            quarantined,
            reason,
        })
    }
}

/// A node key derived from a small number (tests and simulator only).
pub fn fake_node_key(i: u64) -> NodeKey {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b[31] = 0x5a;
    NodeKey::from_secret_bytes(b)
}
