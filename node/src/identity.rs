//! The node's identity key file: 32 secret bytes, created once with mode 0600 and reused
//! across restarts, so a node keeps its id for life.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, bail};
use dwcp_protocol::NodeKey;

/// File name of the identity key inside the data dir.
pub const IDENTITY_FILE: &str = "identity.key";

/// Loads the key at `path`, refusing files that others can read.
pub fn load(path: &Path) -> anyhow::Result<NodeKey> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "identity key {} has mode {mode:o}; it must be readable by its owner only (chmod 600)",
            path.display()
        );
    }
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "identity key {} must be 32 bytes, it is {}",
            path.display(),
            bytes.len()
        )
    })?;
    Ok(NodeKey::from_secret_bytes(secret))
}

/// Creates a new key at `path` (mode 0600); fails if the file exists.
pub fn create(path: &Path) -> anyhow::Result<NodeKey> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = NodeKey::generate(&mut rand::rng());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating identity key {}", path.display()))?;
    f.write_all(&key.secret_bytes())?;
    f.sync_all()?;
    Ok(key)
}

/// Loads the key, creating it first if it does not exist.
pub fn load_or_create(path: &Path) -> anyhow::Result<NodeKey> {
    if path.exists() {
        load(path)
    } else {
        create(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("id.key");
        let a = load_or_create(&p).unwrap();
        let b = load_or_create(&p).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(create(&p).is_err(), "an existing key is never overwritten");
    }

    #[test]
    fn world_readable_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("id.key");
        create(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("chmod 600"));
    }

    #[test]
    fn truncated_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("id.key");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap()
            .write_all(b"short")
            .unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("32 bytes"));
    }
}
