//! The local supervisor's durable state: one SQLite database in STATE_DIR
//! (`state.db`, write-ahead log, full sync on commit), one row per scenario.
//!
//! Every change is one transaction, so a crash or power loss leaves either
//! the old or the new record. Other processes (`runner local list`) read the
//! database while the supervisor writes it.
//!
//! The database holds camera URLs with their credentials: the directory is
//! created 0700 and its files 0600, and a supervisor refuses a state
//! directory other users may enter or read.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::camera_url::Redacted;
use crate::scenario::Phase;
use crate::scenario::ordering::Applied;

/// Where a scenario came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// A `to_deploy` message.
    Kafka,
    /// The scenarios file.
    File,
}

/// One scenario as the supervisor keeps it. Its `Debug` form shows the
/// camera URL redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub uuid: String,
    pub worker_id: Option<String>,
    /// Stays in the state directory; never logged or listed.
    pub camera_url: String,
    pub fps: Option<f64>,
    pub model: Option<String>,
    pub origin: Origin,
    /// The newest deploy and undeploy applied (command ordering).
    pub applied: Applied,
    /// `None`: waiting for admission's first look (new or re-run).
    pub phase: Option<Phase>,
    /// Bumped by every deploy that asks for a new worker (re-run, replace):
    /// a worker started for an older run is no longer wanted.
    pub run: u64,
    /// Place in the FIFO queue.
    pub enqueued_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// Restarts of the current run.
    pub restarts: u32,
    pub pid: Option<u32>,
    /// The worker's start time in clock ticks since boot (`/proc/PID/stat`),
    /// which tells the worker from a later process that reused its PID.
    pub pid_start: Option<u64>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When a worker in restart backoff starts again.
    pub restart_at: Option<DateTime<Utc>>,
    pub queue_position: Option<u32>,
    pub last_error: Option<String>,
}

impl Record {
    /// A fresh record, waiting for admission.
    pub fn new(uuid: &str, target: Target, now: DateTime<Utc>) -> Record {
        Record {
            uuid: uuid.to_string(),
            worker_id: target.worker_id,
            camera_url: target.camera_url,
            fps: target.fps,
            model: target.model,
            origin: target.origin,
            applied: Applied::default(),
            phase: None,
            run: 1,
            enqueued_at: now,
            created_at: now,
            restarts: 0,
            pid: None,
            pid_start: None,
            started_at: None,
            finished_at: None,
            restart_at: None,
            queue_position: None,
            last_error: None,
        }
    }

    /// Its run has ended (Succeeded or Failed).
    pub fn finished(&self) -> bool {
        matches!(self.phase, Some(Phase::Succeeded | Phase::Failed))
    }

    pub fn same_target(&self, target: &Target) -> bool {
        self.camera_url == target.camera_url
            && self.worker_id == target.worker_id
            && self.fps == target.fps
            && self.model == target.model
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("uuid", &self.uuid)
            .field("worker_id", &self.worker_id)
            .field("camera_url", &Redacted(&self.camera_url))
            .field("fps", &self.fps)
            .field("model", &self.model)
            .field("origin", &self.origin)
            .field("applied", &self.applied)
            .field("phase", &self.phase)
            .field("run", &self.run)
            .field("enqueued_at", &self.enqueued_at)
            .field("created_at", &self.created_at)
            .field("restarts", &self.restarts)
            .field("pid", &self.pid)
            .field("pid_start", &self.pid_start)
            .field("started_at", &self.started_at)
            .field("finished_at", &self.finished_at)
            .field("restart_at", &self.restart_at)
            .field("queue_position", &self.queue_position)
            .field("last_error", &self.last_error)
            .finish()
    }
}

/// What a deploy asks to run. Its `Debug` form shows the camera URL redacted.
#[derive(Clone, PartialEq)]
pub struct Target {
    pub worker_id: Option<String>,
    pub camera_url: String,
    pub fps: Option<f64>,
    pub model: Option<String>,
    pub origin: Origin,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("worker_id", &self.worker_id)
            .field("camera_url", &Redacted(&self.camera_url))
            .field("fps", &self.fps)
            .field("model", &self.model)
            .field("origin", &self.origin)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory STATE_DIR={path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "STATE_DIR={path} is open to other users (mode {mode:04o}) and would hold camera URLs with their credentials; run `chmod 700 {path}` and start again"
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
    #[error(
        "another `runner local` uses STATE_DIR={path} (it holds {path}/supervisor.lock); stop it, or give this one its own STATE_DIR"
    )]
    InUse { path: PathBuf },
    #[error("cannot open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("no state database at {path}; start `runner local` with this STATE_DIR first")]
    Missing { path: PathBuf },
    #[error("state database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the stored record of scenario {uuid} cannot be read: {source}")]
    Corrupt {
        uuid: String,
        source: serde_json::Error,
    },
}

pub const DATABASE_FILE: &str = "state.db";

/// The database and the files SQLite keeps beside it.
const DATABASE_FILES: [&str; 3] = ["state.db", "state.db-wal", "state.db-shm"];

/// Mode of the state directory the supervisor creates.
const DIR_MODE: u32 = 0o700;
/// Mode of every file in it.
const FILE_MODE: u32 = 0o600;

/// True when `mode` lets anyone but the owner read, write or enter.
fn open_to_others(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Creates the state directory 0700 when it is missing; refuses one that
/// exists with any group or other permission bit.
pub fn secure_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir_err = |source| StateError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(dir_err)?;
    }
    let mode = std::fs::metadata(dir)
        .map_err(dir_err)?
        .permissions()
        .mode()
        & 0o7777;
    if open_to_others(mode) {
        return Err(StateError::OpenToOthers {
            path: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Takes group and other permissions away from `path` when it exists (a
/// database of an older runner); creates it 0600 when it is missing and
/// `create` says so.
fn private_file(path: &Path, create: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if open_to_others(mode) {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(path)
            .map(drop),
        Err(e) => Err(e),
    }
}

/// Held by the supervisor for its whole life: one supervisor per STATE_DIR.
/// The kernel releases it when the supervisor dies, however it dies, and
/// workers do not inherit it (Rust opens files close-on-exec).
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Creates the directory (0700) if needed and refuses one open to
    /// other users, then takes the lock.
    pub fn take(dir: &Path) -> Result<DirLock, StateError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let dir_err = |source| StateError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        secure_dir(dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(dir.join("supervisor.lock"))
            .map_err(dir_err)?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StateError::InUse {
                path: dir.to_path_buf(),
            });
        }
        Ok(DirLock { _file: file })
    }
}

pub struct StateStore {
    conn: Mutex<Connection>,
}

impl StateStore {
    /// Opens (creating if needed) the database in `dir`. The database and
    /// its write-ahead log and shared-memory files are 0600 (SQLite gives the
    /// latter two the database's mode when it creates them).
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        secure_dir(dir)?;
        for name in DATABASE_FILES {
            // SQLite creates the log files itself; only the database is made here.
            private_file(&dir.join(name), name == DATABASE_FILE).map_err(|source| {
                StateError::Dir {
                    path: dir.to_path_buf(),
                    source,
                }
            })?;
        }
        let path = dir.join(DATABASE_FILE);
        let open_err = |source| StateError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS scenarios (
                 uuid TEXT PRIMARY KEY NOT NULL,
                 record TEXT NOT NULL
             );",
        )
        .map_err(open_err)?;
        Ok(StateStore {
            conn: Mutex::new(conn),
        })
    }

    /// Opens an existing database for reading only (`runner local list`).
    pub fn open_read_only(dir: &Path) -> Result<StateStore, StateError> {
        let path = dir.join(DATABASE_FILE);
        if !path.exists() {
            return Err(StateError::Missing { path });
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| StateError::Open {
                path: path.clone(),
                source,
            },
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(StateStore {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every record, oldest in the queue first.
    pub fn all(&self) -> Result<Vec<Record>, StateError> {
        let conn = self.lock();
        let mut stmt = match conn.prepare("SELECT uuid, record FROM scenarios") {
            Ok(stmt) => stmt,
            // A reader that came before the supervisor created its table.
            Err(rusqlite::Error::SqliteFailure(_, Some(msg)))
                if msg.starts_with("no such table") =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.into()),
        };
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut records = Vec::new();
        for row in rows {
            let (uuid, text) = row?;
            records.push(decode(&uuid, &text)?);
        }
        records.sort_by(|a, b| (a.enqueued_at, &a.uuid).cmp(&(b.enqueued_at, &b.uuid)));
        Ok(records)
    }

    pub fn get(&self, uuid: &str) -> Result<Option<Record>, StateError> {
        let conn = self.lock();
        read(&conn, uuid)
    }

    /// Reads the record of `uuid`, lets `change` edit it, and writes it back
    /// when it changed, all in one transaction.
    pub fn update<T>(
        &self,
        uuid: &str,
        change: impl FnOnce(&mut Option<Record>) -> T,
    ) -> Result<T, StateError> {
        self.update_seeing_others(uuid, |record, _| change(record))
    }

    /// [`StateStore::update`], where `change` may also count the other
    /// scenarios that wait for a worker or hold one ([`Occupancy`]), in the
    /// same transaction.
    pub fn update_seeing_others<T>(
        &self,
        uuid: &str,
        change: impl FnOnce(&mut Option<Record>, &dyn Fn() -> Result<Occupancy, StateError>) -> T,
    ) -> Result<T, StateError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before = read(&tx, uuid)?;
        let mut after = before.clone();
        let out = change(&mut after, &|| occupancy(&tx, uuid));
        if after != before {
            match &after {
                Some(record) => {
                    let text =
                        serde_json::to_string(record).map_err(|source| StateError::Corrupt {
                            uuid: uuid.to_string(),
                            source,
                        })?;
                    tx.execute(
                        "INSERT INTO scenarios (uuid, record) VALUES (?1, ?2)
                         ON CONFLICT(uuid) DO UPDATE SET record = excluded.record",
                        (uuid, text),
                    )?;
                }
                None => {
                    tx.execute("DELETE FROM scenarios WHERE uuid = ?1", [uuid])?;
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }
}

/// The scenarios other than one that want a worker and have none
/// (`waiting`), and those whose worker is starting or running (`live`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub waiting: usize,
    pub live: usize,
}

fn occupancy(conn: &Connection, except: &str) -> Result<Occupancy, StateError> {
    let mut stmt = conn.prepare(
        "SELECT uuid, record FROM scenarios WHERE uuid != ?1 AND
             coalesce(json_extract(record, '$.phase'), 'Queued') IN ('Queued', 'Starting', 'Running')",
    )?;
    let rows = stmt.query_map([except], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut seen = Occupancy::default();
    for row in rows {
        let (uuid, text) = row?;
        let record = decode(&uuid, &text)?;
        match record.phase {
            Some(phase) if phase.is_live() => seen.live += 1,
            None | Some(Phase::Queued) if !record.applied.stopped() => seen.waiting += 1,
            _ => {}
        }
    }
    Ok(seen)
}

fn read(conn: &Connection, uuid: &str) -> Result<Option<Record>, StateError> {
    let text: Option<String> = conn
        .query_row(
            "SELECT record FROM scenarios WHERE uuid = ?1",
            [uuid],
            |row| row.get(0),
        )
        .optional()?;
    text.map(|t| decode(uuid, &t)).transpose()
}

fn decode(uuid: &str, text: &str) -> Result<Record, StateError> {
    serde_json::from_str(text).map_err(|source| StateError::Corrupt {
        uuid: uuid.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(camera: &str) -> Target {
        Target {
            worker_id: None,
            camera_url: camera.into(),
            fps: None,
            model: None,
            origin: Origin::File,
        }
    }

    /// A temporary directory only its owner may use, as a state directory must be.
    fn private_tempdir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn records_survive_reopening_and_are_read_by_a_second_process_handle() {
        let dir = private_tempdir();
        let now = Utc::now();
        {
            let store = StateStore::open(dir.path()).unwrap();
            store
                .update("b", |r| {
                    *r = Some(Record::new("b", target("/v/b.avi"), now))
                })
                .unwrap();
            store
                .update("a", |r| {
                    *r = Some(Record::new(
                        "a",
                        target("/v/a.avi"),
                        now - chrono::Duration::seconds(1),
                    ))
                })
                .unwrap();
            let reader = StateStore::open_read_only(dir.path()).unwrap();
            assert_eq!(reader.all().unwrap().len(), 2);
        }
        let store = StateStore::open(dir.path()).unwrap();
        let all = store.all().unwrap();
        assert_eq!(
            all.iter().map(|r| r.uuid.as_str()).collect::<Vec<_>>(),
            ["a", "b"],
            "oldest in the queue first"
        );
        store.update("a", |r| *r = None).unwrap();
        assert!(store.get("a").unwrap().is_none());
    }

    #[test]
    fn one_supervisor_per_state_dir() {
        let dir = private_tempdir();
        let lock = DirLock::take(dir.path()).unwrap();
        let err = DirLock::take(dir.path()).err().unwrap();
        assert!(err.to_string().contains("another `runner local`"), "{err}");
        drop(lock);
        assert!(DirLock::take(dir.path()).is_ok());
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_state_dir_and_its_files_are_the_owners_alone() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("state");
        let _lock = DirLock::take(&dir).unwrap();
        let store = StateStore::open(&dir).unwrap();
        store
            .update("a", |r| {
                *r = Some(Record::new("a", target("rtsp://u:pw@cam/a"), Utc::now()))
            })
            .unwrap();
        assert_eq!(mode_of(&dir), 0o700);
        for name in DATABASE_FILES.iter().chain(&["supervisor.lock"]) {
            // The write-ahead log and shared memory exist while the store is open.
            assert_eq!(mode_of(&dir.join(name)), 0o600, "{name}");
        }
    }

    #[test]
    fn a_state_dir_open_to_others_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o755, 0o750, 0o701, 0o710] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let err = DirLock::take(dir.path()).err().expect("refused");
            let text = err.to_string();
            let path = dir.path().display().to_string();
            assert!(
                text.contains(&format!("chmod 700 {path}")) && !text.contains('\n'),
                "{mode:o}: {text}"
            );
            assert!(StateStore::open(dir.path()).is_err(), "{mode:o}");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(DirLock::take(dir.path()).is_ok());
    }

    #[test]
    fn an_older_database_readable_by_others_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = private_tempdir();
        let db = dir.path().join(DATABASE_FILE);
        std::fs::write(&db, b"").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        StateStore::open(dir.path()).unwrap();
        assert_eq!(mode_of(&db), 0o600);
    }

    #[test]
    fn debug_forms_show_the_camera_url_redacted() {
        let target = target("rtsp://admin:S3cretPw@cam.example/live?token=T0kenValue");
        let record = Record::new("a", target.clone(), Utc::now());
        for shown in [format!("{target:?}"), format!("{record:?}")] {
            assert!(
                shown.contains("rtsp://***@cam.example/live?token=***")
                    && !shown.contains("S3cretPw")
                    && !shown.contains("admin")
                    && !shown.contains("T0kenValue"),
                "{shown}"
            );
        }
    }

    #[test]
    fn reading_a_missing_database_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = StateStore::open_read_only(dir.path()).err().unwrap();
        assert!(err.to_string().contains("start `runner local`"), "{err}");
    }
}
