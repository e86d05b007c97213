//! The keys file: API keys by name, each with a role and the SHA-256 of its secret (never the
//! secret). `engage keys create|list|revoke` manage it; the server loads it at start and on
//! SIGHUP.
//!
//! Secrets are `engage_` and 64 hex digits: 32 bytes from the OS's generator (256 bits, beyond
//! guessing), with a prefix that secret scanners and people recognise. A fast hash is enough
//! for secrets of that entropy (no password stretching is needed, nothing can be guessed), and
//! every key's digest is compared in constant time on every call.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Caller, Role};

/// The prefix of every secret.
pub(crate) const SECRET_PREFIX: &str = "engage_";

/// One key as the file keeps it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeyRecord {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// Hex SHA-256 of the secret.
    pub(crate) sha256: String,
    /// RFC 3339.
    pub(crate) created_at: String,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct KeysFile {
    keys: Vec<KeyRecord>,
}

/// The keys a server accepts.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    entries: Vec<([u8; 32], Caller)>,
}

impl Keys {
    /// The caller whose secret this is, if any. Every key's digest is compared, in constant time.
    pub(crate) fn lookup(&self, secret: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for (d, caller) in &self.entries {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(caller.clone());
            }
        }
        found
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

fn read(path: &Path) -> Result<KeysFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a keys file: {e}", path.display()))
}

fn write(path: &Path, file: &KeysFile) -> Result<(), String> {
    let text = serde_json::to_string_pretty(file).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    // Under the file's lock (see `locked`): a temporary left by a crash is replaced, never
    // reused with whatever permissions it had.
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = options.open(&tmp).and_then(|mut f| {
        use std::io::Write;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    result
        .and_then(|_| std::fs::rename(&tmp, path))
        .and_then(|_| {
            // The rename itself is durable once the directory is.
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::File::open(dir)?.sync_all()
        })
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs `change` holding an exclusive lock on the keys file's sidecar `.lock` file, so that
/// concurrent `engage keys` runs never lose each other's changes.
fn locked<T>(path: &Path, change: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let lock_path = path.with_extension("lock");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let lock = options
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("{}: cannot lock: {e}", lock_path.display()))?;
    let result = change();
    let _ = lock.unlock();
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads a keys file for the server: every record must be well formed.
pub(crate) fn load(path: &Path) -> Result<Keys, String> {
    let file = read(path)?;
    let mut entries = Vec::with_capacity(file.keys.len());
    for k in file.keys {
        let bytes: Option<Vec<u8>> = (0..k.sha256.len())
            .step_by(2)
            .map(|i| {
                k.sha256
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect();
        let digest: [u8; 32] = bytes.and_then(|b| b.try_into().ok()).ok_or_else(|| {
            format!(
                "{}: key {:?}: sha256 is not 64 hex digits",
                path.display(),
                k.name
            )
        })?;
        entries.push((
            digest,
            Caller {
                name: k.name.into(),
                role: k.role,
                peer: None,
            },
        ));
    }
    Ok(Keys { entries })
}

/// A key name: 1–64 letters, digits, `_`, `.` or `-`.
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {:?}: 1 to 64 letters, digits, '_', '.' or '-'",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// Adds a key (creating the file if missing); answers its secret, which nothing keeps.
pub(crate) fn create(path: &Path, name: &str, role: Role) -> Result<String, String> {
    check_name(name)?;
    locked(path, || create_locked(path, name, role))
}

fn create_locked(path: &Path, name: &str, role: Role) -> Result<String, String> {
    let mut file = if path.exists() {
        read(path)?
    } else {
        KeysFile::default()
    };
    if file.keys.iter().any(|k| k.name == name) {
        return Err(format!(
            "a key named {name:?} already exists in {}",
            path.display()
        ));
    }
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| format!("the OS's random generator failed: {e}"))?;
    let secret = format!("{SECRET_PREFIX}{}", hex(&random));
    file.keys.push(KeyRecord {
        name: name.to_string(),
        role,
        sha256: hex(&Sha256::digest(secret.as_bytes())),
        created_at: jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or(jiff::Timestamp::now())
            .to_string(),
    });
    write(path, &file)?;
    Ok(secret)
}

/// Every key: name, role and creation time, one a line.
pub(crate) fn list(path: &Path) -> Result<String, String> {
    let file = read(path)?;
    Ok(file
        .keys
        .iter()
        .map(|k| format!("{}\t{}\t{}", k.name, k.role, k.created_at))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Removes a key by name.
pub(crate) fn revoke(path: &Path, name: &str) -> Result<(), String> {
    locked(path, || revoke_locked(path, name))
}

fn revoke_locked(path: &Path, name: &str) -> Result<(), String> {
    let mut file = read(path)?;
    let before = file.keys.len();
    file.keys.retain(|k| k.name != name);
    if file.keys.len() == before {
        return Err(format!("no key named {name:?} in {}", path.display()));
    }
    write(path, &file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_is_found_by_its_secret_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let secret = create(&path, "web", Role::Ingest).unwrap();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == SECRET_PREFIX.len() + 64);
        let other = create(&path, "ops", Role::Admin).unwrap();
        assert_ne!(secret, other);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&secret[SECRET_PREFIX.len()..]),
            "the secret is kept"
        );
        let keys = load(&path).unwrap();
        assert_eq!(&*keys.lookup(&secret).unwrap().name, "web");
        assert_eq!(keys.lookup(&other).unwrap().role, Role::Admin);
        assert!(keys.lookup("engage_00").is_none());
        assert!(create(&path, "web", Role::Read)
            .unwrap_err()
            .contains("already exists"));
        assert!(create(&path, "bad name", Role::Read).is_err());
        revoke(&path, "web").unwrap();
        assert!(load(&path).unwrap().lookup(&secret).is_none());
        assert!(revoke(&path, "web").is_err());
    }
}
