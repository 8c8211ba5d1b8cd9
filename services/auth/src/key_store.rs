//! The current set of verification keys, and when to re-read the files.
//!
//! Keys change by editing files, so the store re-reads them on its own:
//!
//! - at most every [`SCAN_INTERVAL`], a validation first checks whether a key
//!   file's size or modification time changed, or a key directory gained or
//!   lost a file, and re-reads only what changed;
//! - a token naming an unknown kid re-reads every file, at most once per
//!   [`FORCED_INTERVAL`], so a key published just before its first token
//!   works at once, while a flood of made-up kids costs one reload a second;
//! - [`KeyStore::reload`] re-reads everything on demand (e.g. on SIGHUP).
//!
//! A file that cannot be read or parsed keeps the keys it gave before (and
//! says so in a warning); a file removed from a key directory retires its
//! keys. A configured file or directory that disappears keeps its keys too:
//! retiring keys by deleting a path from the configuration is a restart.
//!
//! File I/O happens on the validating thread. It is a handful of `stat`
//! calls every two seconds and a read of small files when they change, which
//! is cheaper than handing every validation to a blocking pool.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use crate::KeyError;
use crate::keys::{self, VerificationKey};

/// How often a validation may check the key files for changes.
pub(crate) const SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// How often an unknown kid may force a full reload.
pub(crate) const FORCED_INTERVAL: Duration = Duration::from_secs(1);

/// The keys in force, by kid.
#[derive(Debug, Default)]
pub(crate) struct KeySet {
    by_kid: HashMap<String, Arc<VerificationKey>>,
}

impl KeySet {
    /// The keys of one JWKS document, by kid; of two keys with one kid the
    /// first is kept, and the warning names `source`.
    pub(crate) fn from_keys(keys: Vec<VerificationKey>, source: &str) -> Self {
        let mut by_kid = HashMap::with_capacity(keys.len());
        for key in keys {
            if by_kid.contains_key(&key.kid) {
                tracing::warn!(source, kid = %key.kid, "duplicate kid; the key found first is kept");
                continue;
            }
            by_kid.insert(key.kid.clone(), Arc::new(key));
        }
        Self { by_kid }
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&Arc<VerificationKey>> {
        self.by_kid.get(kid)
    }

    /// The key, when there is exactly one.
    pub(crate) fn only_key(&self) -> Option<&Arc<VerificationKey>> {
        match self.by_kid.len() {
            1 => self.by_kid.values().next(),
            _ => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_kid.len()
    }

    pub(crate) fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.by_kid.keys().cloned().collect();
        kids.sort();
        kids
    }
}

/// Size and modification time: what tells a periodic scan that a file
/// changed. A rewrite that keeps both is caught by the forced reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

#[derive(Debug)]
struct FileState {
    /// `None` when the file could not be stat'ed; the next scan re-reads it.
    fingerprint: Option<Fingerprint>,
    keys: Vec<Arc<VerificationKey>>,
}

#[derive(Debug)]
struct ReloadState {
    /// Every key file known, in discovery order, which decides which of two
    /// keys with the same kid wins.
    files: Vec<(PathBuf, FileState)>,
    last_scan: Instant,
    last_forced: Option<Instant>,
}

/// A cheap-to-share handle on the keys and on the files they come from.
#[derive(Debug)]
pub(crate) struct KeyStore {
    roots: Vec<PathBuf>,
    /// Validations take the read lock only to clone the `Arc`, and a reload
    /// takes the write lock only to swap it, so neither waits on file I/O.
    current: RwLock<Arc<KeySet>>,
    /// Serialises reloads; what it guards is only read and written by them.
    reload: Mutex<ReloadState>,
}

/// The outcome of one scan.
#[derive(Debug, Default)]
struct Scan {
    /// Whether any file was (re)loaded or removed, i.e. the key set must be
    /// rebuilt.
    changed: bool,
    /// Paths that failed, with why.
    problems: Vec<String>,
}

impl KeyStore {
    /// Loads every configured path. Fails when none of them gives a key.
    pub(crate) fn open(roots: Vec<PathBuf>) -> Result<Self, KeyError> {
        if roots.is_empty() {
            return Err(KeyError::NoKeyPaths);
        }
        let store = Self {
            roots,
            current: RwLock::new(Arc::new(KeySet::default())),
            reload: Mutex::new(ReloadState {
                files: Vec::new(),
                last_scan: Instant::now(),
                last_forced: None,
            }),
        };
        let scan = {
            let mut state = store.lock_reload();
            store.scan(&mut state, true)
        };
        if store.current().len() == 0 {
            let mut problems = scan.problems;
            if problems.is_empty() {
                problems.push("no *.pem or *.json key files found".to_owned());
            }
            return Err(KeyError::NoUsableKeys {
                paths: store.roots.clone(),
                problems,
            });
        }
        Ok(store)
    }

    /// The keys in force now.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Re-reads changed files if the last check is [`SCAN_INTERVAL`] old.
    pub(crate) fn refresh_if_due(&self) {
        // A validation that finds another one scanning goes on with the keys
        // it has rather than queueing behind file I/O.
        let mut state = match self.reload.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if state.last_scan.elapsed() < SCAN_INTERVAL {
            return;
        }
        self.scan(&mut state, false);
    }

    /// Re-reads every file because a token named an unknown kid, unless that
    /// happened less than [`FORCED_INTERVAL`] ago. Returns whether it did.
    pub(crate) fn reload_for_unknown_kid(&self) -> bool {
        // Blocking here is deliberate: a reload already running may be the
        // one that brings this kid.
        let mut state = self.lock_reload();
        if state
            .last_forced
            .is_some_and(|at| at.elapsed() < FORCED_INTERVAL)
        {
            return false;
        }
        state.last_forced = Some(Instant::now());
        self.scan(&mut state, true);
        true
    }

    /// Re-reads every file now.
    pub(crate) fn reload(&self) {
        let mut state = self.lock_reload();
        self.scan(&mut state, true);
    }

    fn lock_reload(&self) -> MutexGuard<'_, ReloadState> {
        // The state is consistent between statements, so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.reload.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Walks the configured paths. `force` re-reads files whose fingerprint
    /// did not change too.
    fn scan(&self, state: &mut ReloadState, force: bool) -> Scan {
        state.last_scan = Instant::now();
        let mut previous: HashMap<PathBuf, FileState> = state.files.drain(..).collect();
        let mut next: Vec<(PathBuf, FileState)> = Vec::new();
        let mut seen: HashSet<PathBuf> = HashSet::new();
        let mut scan = Scan::default();

        for root in &self.roots {
            let listing = match std::fs::metadata(root) {
                Ok(meta) if meta.is_dir() => list_key_files(root),
                Ok(_) => Ok(vec![root.clone()]),
                Err(e) => Err(e),
            };
            let files = match listing {
                Ok(files) => files,
                Err(error) => {
                    tracing::warn!(
                        path = %root.display(),
                        %error,
                        "cannot read key path; keeping its previous keys"
                    );
                    scan.problems
                        .push(format!("{}: cannot read: {error}", root.display()));
                    // Whatever this root gave before stays: the file itself,
                    // or the files of the directory it was.
                    let kept: Vec<PathBuf> = previous
                        .keys()
                        .filter(|path| *path == root || path.parent() == Some(root.as_path()))
                        .cloned()
                        .collect();
                    for path in kept {
                        if let Some(file) = previous.remove(&path)
                            && seen.insert(path.clone())
                        {
                            next.push((path, file));
                        }
                    }
                    continue;
                }
            };
            for path in files {
                if !seen.insert(path.clone()) {
                    continue;
                }
                let file = refresh_file(&path, previous.remove(&path), force, &mut scan);
                next.push((path, file));
            }
        }

        for (path, file) in &previous {
            if !file.keys.is_empty() {
                tracing::info!(
                    path = %path.display(),
                    keys = file.keys.len(),
                    "key file removed; its keys are retired"
                );
            }
            scan.changed = true;
        }
        state.files = next;

        if scan.changed {
            let set = build_key_set(&state.files);
            tracing::info!(keys = set.len(), kids = ?set.kids(), "verification keys loaded");
            *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        }
        scan
    }
}

/// The `*.pem` and `*.json` files of a directory, sorted by name so that the
/// winner between duplicate kids does not depend on the file system.
fn list_key_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_key_file = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| ext.eq_ignore_ascii_case("pem") || ext.eq_ignore_ascii_case("json"));
        // `is_file` follows symlinks, as Kubernetes secret mounts need.
        if is_key_file && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn refresh_file(
    path: &Path,
    previous: Option<FileState>,
    force: bool,
    scan: &mut Scan,
) -> FileState {
    let fingerprint = fingerprint(path);
    if let Some(previous) = previous.as_ref()
        && !force
        && fingerprint.is_some()
        && previous.fingerprint == fingerprint
    {
        return FileState {
            fingerprint,
            keys: previous.keys.clone(),
        };
    }
    match keys::load_key_file(path) {
        Ok(loaded) => {
            for reason in &loaded.skipped {
                tracing::warn!(path = %path.display(), reason = %reason, "key skipped");
            }
            tracing::debug!(path = %path.display(), keys = loaded.keys.len(), "key file read");
            scan.changed = true;
            FileState {
                fingerprint,
                keys: loaded.keys.into_iter().map(Arc::new).collect(),
            }
        }
        Err(reason) => {
            let kept = previous.map(|p| p.keys).unwrap_or_default();
            tracing::warn!(
                path = %path.display(),
                reason = %reason,
                kept_keys = kept.len(),
                "key file unusable; keeping its previous keys"
            );
            scan.problems.push(format!("{}: {reason}", path.display()));
            // The fingerprint is remembered so that the periodic scan does not
            // warn every two seconds about the same broken file; a change to
            // it, or a forced reload, tries again.
            FileState {
                fingerprint,
                keys: kept,
            }
        }
    }
}

fn build_key_set(files: &[(PathBuf, FileState)]) -> KeySet {
    let mut by_kid: HashMap<String, Arc<VerificationKey>> = HashMap::new();
    for (path, file) in files {
        for key in &file.keys {
            if by_kid.contains_key(&key.kid) {
                tracing::warn!(
                    path = %path.display(),
                    kid = %key.kid,
                    "duplicate kid; the key found first is kept"
                );
                continue;
            }
            by_kid.insert(key.kid.clone(), Arc::clone(key));
        }
    }
    KeySet { by_kid }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::fixture;

    fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write key file");
        path
    }

    #[test]
    fn a_directory_loads_pem_and_json_files_and_ignores_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.pem", &fixture("es256-a.pem"));
        write(dir.path(), "set.json", &fixture("jwks.json"));
        write(dir.path(), "notes.txt", "not a key");
        write(dir.path(), "ignored.key", &fixture("es256-b.key"));
        let store = KeyStore::open(vec![dir.path().to_path_buf()]).expect("keys load");
        assert_eq!(
            store.current().kids(),
            ["a", "jwks-ec-a", "jwks-ec-b", "jwks-ed"]
        );
    }

    #[test]
    fn no_usable_key_is_an_error_naming_the_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broken = write(dir.path(), "broken.pem", "garbage");
        let missing = dir.path().join("missing.pem");
        let err = KeyStore::open(vec![broken.clone(), missing.clone()]).expect_err("no keys");
        let message = err.to_string();
        assert!(matches!(err, KeyError::NoUsableKeys { .. }), "{err:?}");
        assert!(message.contains(&broken.display().to_string()), "{message}");
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("not a PEM document"), "{message}");

        let empty = tempfile::tempdir().expect("tempdir");
        let err = KeyStore::open(vec![empty.path().to_path_buf()]).expect_err("empty dir");
        assert!(err.to_string().contains("no *.pem or *.json"), "{err}");

        let err = KeyStore::open(Vec::new()).expect_err("no paths");
        assert!(matches!(err, KeyError::NoKeyPaths), "{err:?}");
    }

    #[test]
    fn a_broken_file_is_skipped_at_start_when_others_work() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.pem", &fixture("es256-a.pem"));
        write(dir.path(), "b.pem", "garbage");
        let store = KeyStore::open(vec![dir.path().to_path_buf()]).expect("one key loads");
        assert_eq!(store.current().kids(), ["a"]);
    }

    #[test]
    fn the_first_of_two_keys_with_one_kid_wins() {
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        write(first.path(), "same.pem", &fixture("es256-a.pem"));
        write(second.path(), "same.pem", &fixture("ed25519.pem"));
        let store = KeyStore::open(vec![
            first.path().to_path_buf(),
            second.path().to_path_buf(),
        ])
        .expect("keys load");
        let set = store.current();
        assert_eq!(set.len(), 1);
        let key = set.get("same").expect("kid present");
        assert_eq!(key.kind, crate::keys::KeyKind::EcP256);
    }

    #[test]
    fn a_broken_rewrite_keeps_the_previous_keys_and_a_removal_retires_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write(dir.path(), "a.pem", &fixture("es256-a.pem"));
        write(dir.path(), "b.pem", &fixture("es256-b.pem"));
        let store = KeyStore::open(vec![dir.path().to_path_buf()]).expect("keys load");

        std::fs::write(&a, "-----BEGIN PUBLIC KEY-----\ntruncated").expect("break a.pem");
        store.reload();
        assert_eq!(store.current().kids(), ["a", "b"], "a.pem's key survives");

        std::fs::remove_file(&a).expect("remove a.pem");
        store.reload();
        assert_eq!(store.current().kids(), ["b"], "a.pem's key is retired");
    }

    #[test]
    fn the_periodic_scan_picks_up_changes_only_when_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.pem", &fixture("es256-a.pem"));
        let store = KeyStore::open(vec![dir.path().to_path_buf()]).expect("keys load");
        write(dir.path(), "b.pem", &fixture("es256-b.pem"));

        store.refresh_if_due();
        assert_eq!(store.current().kids(), ["a"], "not due yet");

        store.lock_reload().last_scan = Instant::now() - SCAN_INTERVAL;
        store.refresh_if_due();
        assert_eq!(store.current().kids(), ["a", "b"], "due, so b.pem is found");
    }

    #[test]
    fn a_forced_reload_rereads_a_rewrite_the_fingerprint_misses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "k.pem", &fixture("es256-a.pem"));
        let store = KeyStore::open(vec![dir.path().to_path_buf()]).expect("keys load");
        let before = std::fs::metadata(&path).expect("stat");

        // Another P-256 key has the same PEM length; put the old mtime back.
        let replacement = fixture("es256-b.pem");
        assert_eq!(replacement.len() as u64, before.len());
        std::fs::write(&path, &replacement).expect("rewrite");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_modified(before.modified()?))
            .expect("restore mtime");
        let old_key = Arc::clone(store.current().get("k").expect("k"));

        store.lock_reload().last_scan = Instant::now() - SCAN_INTERVAL;
        store.refresh_if_due();
        let unchanged = store.current();
        let after_scan = unchanged.get("k").expect("k");
        assert!(Arc::ptr_eq(after_scan, &old_key), "the fingerprint matched");

        assert!(store.reload_for_unknown_kid());
        let reloaded = store.current();
        let after_reload = reloaded.get("k").expect("k");
        assert!(
            !Arc::ptr_eq(after_reload, &old_key),
            "a forced reload re-reads"
        );
    }

    #[test]
    fn forced_reloads_are_rate_limited() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "a.pem", &fixture("es256-a.pem"));
        let store = KeyStore::open(vec![dir.path().to_path_buf()]).expect("keys load");

        assert!(store.reload_for_unknown_kid(), "the first one runs");
        write(dir.path(), "b.pem", &fixture("es256-b.pem"));
        assert!(
            !store.reload_for_unknown_kid(),
            "the second within 1 s does not"
        );
        assert_eq!(store.current().kids(), ["a"]);

        store.lock_reload().last_forced = Some(Instant::now() - FORCED_INTERVAL);
        assert!(store.reload_for_unknown_kid());
        assert_eq!(store.current().kids(), ["a", "b"]);
    }

    #[test]
    fn a_vanished_configured_file_keeps_its_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write(dir.path(), "a.pem", &fixture("es256-a.pem"));
        let store = KeyStore::open(vec![a.clone()]).expect("key loads");
        std::fs::remove_file(&a).expect("remove");
        store.reload();
        assert_eq!(store.current().kids(), ["a"]);
    }
}
