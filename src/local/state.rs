//! The local supervisor's durable state: one SQLite database in STATE_DIR
//! (`state.db`, write-ahead log, full sync on commit), one row per scenario.
//!
//! Every change is one transaction, so a crash or power loss leaves either
//! the old or the new record. Other processes (`runner local list`) read the
//! database while the supervisor writes it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

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

/// One scenario as the supervisor keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// What a deploy asks to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub worker_id: Option<String>,
    pub camera_url: String,
    pub fps: Option<f64>,
    pub model: Option<String>,
    pub origin: Origin,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory STATE_DIR={path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// Held by the supervisor for its whole life: one supervisor per STATE_DIR.
/// The kernel releases it when the supervisor dies, however it dies, and
/// workers do not inherit it (Rust opens files close-on-exec).
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    pub fn take(dir: &Path) -> Result<DirLock, StateError> {
        use std::os::fd::AsRawFd;
        let dir_err = |source| StateError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
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
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
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
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before = read(&tx, uuid)?;
        let mut after = before.clone();
        let out = change(&mut after);
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

    #[test]
    fn records_survive_reopening_and_are_read_by_a_second_process_handle() {
        let dir = tempfile::tempdir().unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::take(dir.path()).unwrap();
        let err = DirLock::take(dir.path()).err().unwrap();
        assert!(err.to_string().contains("another `runner local`"), "{err}");
        drop(lock);
        assert!(DirLock::take(dir.path()).is_ok());
    }

    #[test]
    fn reading_a_missing_database_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = StateStore::open_read_only(dir.path()).err().unwrap();
        assert!(err.to_string().contains("start `runner local`"), "{err}");
    }
}
