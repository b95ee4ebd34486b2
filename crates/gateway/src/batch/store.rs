//! The Batch API's durable state: files, batches and every line's result in one SQLite database
//! (`<data_dir>/batch.sqlite3`), file contents beside it (`<data_dir>/files/<id>`).
//!
//! Durability rule: a line's result is written in the same transaction that marks it done and counts
//! it in its batch, so a crash (even `kill -9`) leaves each line either pending (it runs again) or done
//! with its result (it never runs again). The database runs in WAL mode with `synchronous = NORMAL`: a
//! committed transaction survives a process crash (the OS holds the WAL), only a power loss may lose the
//! last commits. File contents are written under a temporary name and renamed before their row exists;
//! files without a row (a crash in between) are removed when the store opens.
//!
//! Every method is blocking; async callers go through [`super::Batches::db`] (`spawn_blocking`).

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Seconds since the Unix epoch (OpenAI's timestamps).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A store error, as text for the log and a 500.
pub type StoreResult<T> = Result<T, String>;

fn sql(e: rusqlite::Error) -> String {
    format!("batch store: {e}")
}

/// The open database and the files directory.
pub struct Store {
    conn: Connection,
    files_dir: PathBuf,
}

/// One stored file (OpenAI's file object).
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    /// `file-...`.
    pub id: String,
    /// The tenant that owns it (empty when auth is off).
    pub owner: String,
    /// `batch`, `batch_output`.
    pub purpose: String,
    /// The uploaded name.
    pub filename: String,
    /// Size in bytes.
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds when it is deleted.
    pub expires_at: i64,
}

impl FileRow {
    /// OpenAI's file object.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }
}

/// A batch's status (OpenAI's state machine).
pub mod status {
    /// Input being checked.
    pub const VALIDATING: &str = "validating";
    /// The input did not validate (see `errors`).
    pub const FAILED: &str = "failed";
    /// Lines are running.
    pub const IN_PROGRESS: &str = "in_progress";
    /// Every line ran; output files being written.
    pub const FINALIZING: &str = "finalizing";
    /// Done; output files ready.
    pub const COMPLETED: &str = "completed";
    /// The completion window passed; finished lines kept.
    pub const EXPIRED: &str = "expired";
    /// Cancel asked; lines in flight finishing.
    pub const CANCELLING: &str = "cancelling";
    /// Cancelled; finished lines kept.
    pub const CANCELLED: &str = "cancelled";
    /// Statuses that never change again.
    pub const TERMINAL: [&str; 4] = [FAILED, COMPLETED, EXPIRED, CANCELLED];
}

/// One stored batch (OpenAI's batch object).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchRow {
    /// `batch_...`.
    pub id: String,
    /// The tenant that owns it.
    pub owner: String,
    /// The input file.
    pub input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`.
    pub endpoint: String,
    /// `24h`.
    pub completion_window: String,
    /// Client metadata (a JSON object) or null.
    pub metadata: Value,
    /// See [`status`].
    pub status: String,
    /// `{"object":"list","data":[...]}` when validation failed, else null.
    pub errors: Value,
    /// File of the successful lines' outputs.
    pub output_file_id: Option<String>,
    /// File of the failed lines' outputs.
    pub error_file_id: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub in_progress_at: Option<i64>,
    /// Unix seconds: the end of the completion window.
    pub expires_at: i64,
    /// Unix seconds.
    pub finalizing_at: Option<i64>,
    /// Unix seconds.
    pub completed_at: Option<i64>,
    /// Unix seconds.
    pub failed_at: Option<i64>,
    /// Unix seconds.
    pub expired_at: Option<i64>,
    /// Unix seconds.
    pub cancelling_at: Option<i64>,
    /// Unix seconds.
    pub cancelled_at: Option<i64>,
    /// Lines in the input.
    pub total: i64,
    /// Lines answered 2xx.
    pub completed: i64,
    /// Lines that failed.
    pub failed: i64,
}

impl BatchRow {
    /// OpenAI's batch object.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        })
    }

    /// Whether the status never changes again.
    pub fn is_terminal(&self) -> bool {
        status::TERMINAL.contains(&self.status.as_str())
    }

    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        let json_col = |i: usize| -> rusqlite::Result<Value> {
            let text: Option<String> = r.get(i)?;
            Ok(text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null))
        };
        Ok(Self {
            id: r.get(0)?,
            owner: r.get(1)?,
            input_file_id: r.get(2)?,
            endpoint: r.get(3)?,
            completion_window: r.get(4)?,
            metadata: json_col(5)?,
            status: r.get(6)?,
            errors: json_col(7)?,
            output_file_id: r.get(8)?,
            error_file_id: r.get(9)?,
            created_at: r.get(10)?,
            in_progress_at: r.get(11)?,
            expires_at: r.get(12)?,
            finalizing_at: r.get(13)?,
            completed_at: r.get(14)?,
            failed_at: r.get(15)?,
            expired_at: r.get(16)?,
            cancelling_at: r.get(17)?,
            cancelled_at: r.get(18)?,
            total: r.get(19)?,
            completed: r.get(20)?,
            failed: r.get(21)?,
        })
    }
}

const BATCH_COLS: &str = "id, owner, input_file_id, endpoint, completion_window, metadata, status, errors, \
    output_file_id, error_file_id, created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, \
    expired_at, cancelling_at, cancelled_at, total, completed, failed";

const FILE_COLS: &str = "id, owner, purpose, filename, bytes, created_at, expires_at";

fn file_from_row(r: &Row<'_>) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        purpose: r.get(2)?,
        filename: r.get(3)?,
        bytes: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
    })
}

/// A line waiting to run.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingLine {
    /// 0-based position in the input file.
    pub idx: i64,
    /// Position in run order (model, then shared prefix).
    pub ord: i64,
    /// The body to send.
    pub body: Vec<u8>,
}

/// A line's result.
#[derive(Debug, Clone, PartialEq)]
pub struct LineResult {
    /// The HTTP status (0 when no response was obtained).
    pub status_code: u16,
    /// The gateway's request id.
    pub request_id: String,
    /// The response body (JSON text), when there was a response.
    pub body: Option<String>,
    /// `{"code","message"}` when no response was obtained.
    pub error: Option<Value>,
}

impl LineResult {
    /// Counted as completed (2xx) or failed.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status_code) && self.error.is_none()
    }
}

/// A validated input line, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLine {
    /// The client's id.
    pub custom_id: String,
    /// Position in run order.
    pub ord: i64,
    /// The body to send.
    pub body: Vec<u8>,
}

/// What finalizing a batch wrote.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Finalized {
    /// Output file (successful lines), when any.
    pub output_file_id: Option<String>,
    /// Error file (failed or unrun lines), when any.
    pub error_file_id: Option<String>,
}

impl Store {
    /// Opens (creating) `<data_dir>/batch.sqlite3` and `<data_dir>/files`, and removes files left
    /// without a row by a crash.
    pub fn open(data_dir: &Path) -> StoreResult<Store> {
        let files_dir = data_dir.join("files");
        std::fs::create_dir_all(&files_dir).map_err(|e| format!("batch store: {}: {e}", files_dir.display()))?;
        let conn = Connection::open(data_dir.join("batch.sqlite3")).map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS files (
                id TEXT PRIMARY KEY, seq INTEGER NOT NULL, owner TEXT NOT NULL, purpose TEXT NOT NULL,
                filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS files_owner ON files(owner, seq);
             CREATE TABLE IF NOT EXISTS batches (
                id TEXT PRIMARY KEY, seq INTEGER NOT NULL, owner TEXT NOT NULL, input_file_id TEXT NOT NULL,
                endpoint TEXT NOT NULL, completion_window TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL,
                errors TEXT, output_file_id TEXT, error_file_id TEXT, created_at INTEGER NOT NULL,
                in_progress_at INTEGER, expires_at INTEGER NOT NULL, finalizing_at INTEGER, completed_at INTEGER,
                failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
                total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
                failed INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX IF NOT EXISTS batches_owner ON batches(owner, seq);
             CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
             CREATE TABLE IF NOT EXISTS lines (
                batch_id TEXT NOT NULL, idx INTEGER NOT NULL, ord INTEGER NOT NULL, custom_id TEXT NOT NULL,
                body BLOB NOT NULL, done INTEGER NOT NULL DEFAULT 0, line_id TEXT, status_code INTEGER,
                request_id TEXT, response TEXT, error TEXT, PRIMARY KEY (batch_id, idx));
             CREATE INDEX IF NOT EXISTS lines_todo ON lines(batch_id, done, ord);",
        )
        .map_err(sql)?;
        let store = Store { conn, files_dir };
        store.remove_orphan_files()?;
        Ok(store)
    }

    /// Where a file's content lives.
    pub fn file_path(&self, id: &str) -> PathBuf {
        self.files_dir.join(id)
    }

    /// A fresh temporary path in the files directory (renamed into place by [`Store::insert_file`]).
    pub fn temp_path(&self) -> PathBuf {
        self.files_dir.join(format!("upload-{}.part", uuid::Uuid::new_v4().simple()))
    }

    fn remove_orphan_files(&self) -> StoreResult<()> {
        let entries = std::fs::read_dir(&self.files_dir).map_err(|e| format!("batch store: {e}"))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let known = !name.ends_with(".part")
                && self
                    .conn
                    .query_row("SELECT 1 FROM files WHERE id = ?1", [&name], |_| Ok(()))
                    .optional()
                    .map_err(sql)?
                    .is_some();
            if !known {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn next_seq(&self, table: &str) -> StoreResult<i64> {
        self.conn.query_row(&format!("SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}"), [], |r| r.get(0)).map_err(sql)
    }

    /// Moves `temp` into place as file `row.id` and records it.
    pub fn insert_file(&self, temp: &Path, row: &FileRow) -> StoreResult<()> {
        std::fs::rename(temp, self.file_path(&row.id)).map_err(|e| format!("batch store: storing a file: {e}"))?;
        let seq = self.next_seq("files")?;
        self.conn
            .execute(
                &format!("INSERT INTO files (seq, {FILE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![seq, row.id, row.owner, row.purpose, row.filename, row.bytes, row.created_at, row.expires_at],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// File `id` when `owner` owns it (`None` owner: any).
    pub fn file(&self, id: &str, owner: Option<&str>) -> StoreResult<Option<FileRow>> {
        let row = self
            .conn
            .query_row(&format!("SELECT {FILE_COLS} FROM files WHERE id = ?1"), [id], file_from_row)
            .optional()
            .map_err(sql)?;
        Ok(row.filter(|f| owner.is_none_or(|o| o == f.owner)))
    }

    /// `owner`'s files, newest first, after the file `after` (a cursor), at most `limit` (+1 to tell
    /// whether there are more).
    pub fn list_files(
        &self,
        owner: Option<&str>,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<FileRow>> {
        let after_seq = self.cursor("files", owner, after)?;
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {FILE_COLS} FROM files WHERE (?1 IS NULL OR owner = ?1) AND seq < ?2
                 AND (?3 IS NULL OR purpose = ?3)
                 ORDER BY seq DESC LIMIT ?4"
            ))
            .map_err(sql)?;
        let rows = stmt.query_map(params![owner, after_seq, purpose, limit as i64], file_from_row).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// The `seq` of item `after` (a page cursor) when `owner` can see it, else the top.
    fn cursor(&self, table: &str, owner: Option<&str>, after: Option<&str>) -> StoreResult<i64> {
        let Some(after) = after else { return Ok(i64::MAX) };
        let seq: Option<i64> = self
            .conn
            .query_row(
                &format!("SELECT seq FROM {table} WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)"),
                params![after, owner],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        Ok(seq.unwrap_or(i64::MAX))
    }

    /// Deletes file `id` (row and content); `false` when `owner` has no such file.
    pub fn delete_file(&self, id: &str, owner: Option<&str>) -> StoreResult<bool> {
        if self.file(id, owner)?.is_none() {
            return Ok(false);
        }
        self.conn.execute("DELETE FROM files WHERE id = ?1", [id]).map_err(sql)?;
        let _ = std::fs::remove_file(self.file_path(id));
        Ok(true)
    }

    /// Deletes files whose `expires_at` passed; returns how many.
    pub fn delete_expired_files(&self, now: i64) -> StoreResult<usize> {
        let ids: Vec<String> = {
            let mut stmt = self.conn.prepare("SELECT id FROM files WHERE expires_at <= ?1").map_err(sql)?;
            let rows = stmt.query_map([now], |r| r.get(0)).map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)?
        };
        for id in &ids {
            self.delete_file(id, None)?;
        }
        Ok(ids.len())
    }

    /// Records a new batch (status `validating`).
    pub fn insert_batch(&self, b: &BatchRow) -> StoreResult<()> {
        let seq = self.next_seq("batches")?;
        self.conn
            .execute(
                "INSERT INTO batches (seq, id, owner, input_file_id, endpoint, completion_window, metadata, status,
                 created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    seq,
                    b.id,
                    b.owner,
                    b.input_file_id,
                    b.endpoint,
                    b.completion_window,
                    b.metadata.to_string(),
                    b.status,
                    b.created_at,
                    b.expires_at
                ],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Batch `id` when `owner` owns it (`None` owner: any).
    pub fn batch(&self, id: &str, owner: Option<&str>) -> StoreResult<Option<BatchRow>> {
        let row = self
            .conn
            .query_row(&format!("SELECT {BATCH_COLS} FROM batches WHERE id = ?1"), [id], BatchRow::from_row)
            .optional()
            .map_err(sql)?;
        Ok(row.filter(|b| owner.is_none_or(|o| o == b.owner)))
    }

    /// Batches newest first (of `owner`, or everyone's), after the batch `after`, at most `limit`.
    pub fn list_batches(&self, owner: Option<&str>, after: Option<&str>, limit: usize) -> StoreResult<Vec<BatchRow>> {
        let after_seq = self.cursor("batches", owner, after)?;
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {BATCH_COLS} FROM batches WHERE (?1 IS NULL OR owner = ?1) AND seq < ?2
                 ORDER BY seq DESC LIMIT ?3"
            ))
            .map_err(sql)?;
        let rows = stmt.query_map(params![owner, after_seq, limit as i64], BatchRow::from_row).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Every batch not in a terminal status, oldest first.
    pub fn open_batches(&self) -> StoreResult<Vec<BatchRow>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {BATCH_COLS} FROM batches WHERE status NOT IN ('failed', 'completed', 'expired', 'cancelled')
                 ORDER BY seq"
            ))
            .map_err(sql)?;
        let rows = stmt.query_map([], BatchRow::from_row).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Batches per status, for metrics.
    pub fn count_by_status(&self) -> StoreResult<Vec<(String, i64)>> {
        let mut stmt = self.conn.prepare("SELECT status, COUNT(*) FROM batches GROUP BY status").map_err(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Validation passed: the lines go in and the batch goes `in_progress`, in one transaction.
    pub fn start_batch(&mut self, id: &str, lines: &[NewLine], now: i64) -> StoreResult<()> {
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut insert = tx
                .prepare(
                    "INSERT OR REPLACE INTO lines (batch_id, idx, ord, custom_id, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql)?;
            for (idx, line) in lines.iter().enumerate() {
                insert.execute(params![id, idx as i64, line.ord, line.custom_id, line.body]).map_err(sql)?;
            }
        }
        tx.execute(
            "UPDATE batches SET status = 'in_progress', in_progress_at = ?2, total = ?3 WHERE id = ?1
             AND status = 'validating'",
            params![id, now, lines.len() as i64],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Validation failed: the batch goes `failed` with `errors` (OpenAI's list object).
    pub fn fail_batch(&self, id: &str, errors: &Value, now: i64) -> StoreResult<()> {
        self.conn
            .execute(
                "UPDATE batches SET status = 'failed', failed_at = ?2, errors = ?3 WHERE id = ?1",
                params![id, now, errors.to_string()],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Asks batch `id` to cancel: `validating`/`in_progress` go `cancelling`. Returns the batch after.
    pub fn cancel_batch(&self, id: &str, owner: Option<&str>, now: i64) -> StoreResult<Option<BatchRow>> {
        if self.batch(id, owner)?.is_none() {
            return Ok(None);
        }
        self.conn
            .execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = ?2 WHERE id = ?1
                 AND status IN ('validating', 'in_progress')",
                params![id, now],
            )
            .map_err(sql)?;
        self.batch(id, owner)
    }

    /// Up to `limit` lines of batch `id` not done yet, in run order after `after_ord`.
    pub fn pending_lines(&self, id: &str, after_ord: i64, limit: usize) -> StoreResult<Vec<PendingLine>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT idx, ord, body FROM lines WHERE batch_id = ?1 AND done = 0 AND ord > ?2 ORDER BY ord LIMIT ?3",
            )
            .map_err(sql)?;
        let rows = stmt
            .query_map(params![id, after_ord, limit as i64], |r| {
                Ok(PendingLine { idx: r.get(0)?, ord: r.get(1)?, body: r.get(2)? })
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// Records line `idx`'s result, marks it done and counts it in its batch, in one transaction.
    /// A line already done is left as it is (returns `false`): a result is never recorded twice.
    pub fn finish_line(&mut self, id: &str, idx: i64, result: &LineResult) -> StoreResult<bool> {
        let tx = self.conn.transaction().map_err(sql)?;
        let line_id = format!("batch_req_{}", uuid::Uuid::new_v4().simple());
        let changed = tx
            .execute(
                "UPDATE lines SET done = 1, line_id = ?3, status_code = ?4, request_id = ?5, response = ?6, error = ?7
                 WHERE batch_id = ?1 AND idx = ?2 AND done = 0",
                params![
                    id,
                    idx,
                    line_id,
                    result.status_code,
                    result.request_id,
                    result.body,
                    result.error.as_ref().map(Value::to_string)
                ],
            )
            .map_err(sql)?;
        if changed == 1 {
            let column = if result.succeeded() { "completed" } else { "failed" };
            tx.execute(&format!("UPDATE batches SET {column} = {column} + 1 WHERE id = ?1"), [id]).map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(changed == 1)
    }

    /// Marks batch `id` `finalizing` (when it is `in_progress`).
    pub fn mark_finalizing(&self, id: &str, now: i64) -> StoreResult<()> {
        self.conn
            .execute(
                "UPDATE batches SET status = 'finalizing', finalizing_at = ?2 WHERE id = ?1 AND status = 'in_progress'",
                params![id, now],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Writes batch `id`'s output and error files in input order and moves it to `final_status`
    /// (`completed`, `expired` or `cancelled`) in one transaction with the files' rows. Lines never run
    /// go to the error file with `unrun_code` (`batch_expired`, `batch_cancelled`).
    pub fn finalize(
        &mut self,
        id: &str,
        final_status: &str,
        unrun_code: &str,
        ttl_secs: i64,
    ) -> StoreResult<Finalized> {
        let Some(batch) = self.batch(id, None)? else { return Ok(Finalized::default()) };
        let now = unix_now();
        let out_tmp = self.temp_path();
        let err_tmp = self.temp_path();
        let (n_out, n_err, out_bytes, err_bytes) = self.write_outputs(id, unrun_code, &out_tmp, &err_tmp)?;
        let mut done = Finalized::default();
        let mut files = Vec::new();
        for (n, bytes, tmp, suffix) in [(n_out, out_bytes, &out_tmp, "output"), (n_err, err_bytes, &err_tmp, "error")] {
            if n == 0 {
                let _ = std::fs::remove_file(tmp);
                continue;
            }
            let file_id = format!("file-{}", uuid::Uuid::new_v4().simple());
            std::fs::rename(tmp, self.file_path(&file_id)).map_err(|e| format!("batch store: {e}"))?;
            let row = FileRow {
                id: file_id.clone(),
                owner: batch.owner.clone(),
                purpose: "batch_output".into(),
                filename: format!("{id}_{suffix}.jsonl"),
                bytes: bytes as i64,
                created_at: now,
                expires_at: now.saturating_add(ttl_secs),
            };
            if suffix == "output" {
                done.output_file_id = Some(file_id);
            } else {
                done.error_file_id = Some(file_id);
            }
            files.push(row);
        }
        let tx = self.conn.transaction().map_err(sql)?;
        for row in &files {
            let seq: i64 =
                tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM files", [], |r| r.get(0)).map_err(sql)?;
            tx.execute(
                &format!("INSERT INTO files (seq, {FILE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![seq, row.id, row.owner, row.purpose, row.filename, row.bytes, row.created_at, row.expires_at],
            )
            .map_err(sql)?;
        }
        let at_column = match final_status {
            status::COMPLETED => "completed_at",
            status::EXPIRED => "expired_at",
            _ => "cancelled_at",
        };
        tx.execute(
            &format!(
                "UPDATE batches SET status = ?2, {at_column} = ?3, output_file_id = ?4, error_file_id = ?5,
                 finalizing_at = COALESCE(finalizing_at, ?3) WHERE id = ?1"
            ),
            params![id, final_status, now, done.output_file_id, done.error_file_id],
        )
        .map_err(sql)?;
        // The lines' bodies and results now live in the output files.
        tx.execute("DELETE FROM lines WHERE batch_id = ?1", [id]).map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(done)
    }

    /// Streams the lines of batch `id` into the output (2xx) and error files; returns the line counts
    /// and byte sizes of both.
    fn write_outputs(
        &self,
        id: &str,
        unrun_code: &str,
        out_path: &Path,
        err_path: &Path,
    ) -> StoreResult<(usize, usize, u64, u64)> {
        use std::io::Write;
        let io = |e: std::io::Error| format!("batch store: writing output: {e}");
        let mut out = CountingWriter::new(std::fs::File::create(out_path).map_err(io)?);
        let mut err = CountingWriter::new(std::fs::File::create(err_path).map_err(io)?);
        let (mut n_out, mut n_err) = (0, 0);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT custom_id, done, line_id, status_code, request_id, response, error FROM lines
                 WHERE batch_id = ?1 ORDER BY idx",
            )
            .map_err(sql)?;
        let mut rows = stmt.query([id]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let custom_id: String = r.get(0).map_err(sql)?;
            let done: bool = r.get(1).map_err(sql)?;
            let line_id: Option<String> = r.get(2).map_err(sql)?;
            let status_code: Option<i64> = r.get(3).map_err(sql)?;
            let request_id: Option<String> = r.get(4).map_err(sql)?;
            let response: Option<String> = r.get(5).map_err(sql)?;
            let error: Option<String> = r.get(6).map_err(sql)?;
            let line_id = line_id.unwrap_or_else(|| format!("batch_req_{}", uuid::Uuid::new_v4().simple()));
            let (line, ok) = if !done {
                let message = if unrun_code == "batch_expired" {
                    "This line could not be executed before the completion window expired."
                } else {
                    "This line was not executed because the batch was cancelled."
                };
                let e = json!({"code": unrun_code, "message": message});
                (json!({"id": line_id, "custom_id": custom_id, "response": null, "error": e}), false)
            } else if let Some(e) = error.and_then(|e| serde_json::from_str::<Value>(&e).ok()) {
                (json!({"id": line_id, "custom_id": custom_id, "response": null, "error": e}), false)
            } else {
                let code = status_code.unwrap_or(0);
                let body = response
                    .map(|text| serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)))
                    .unwrap_or(Value::Null);
                let resp = json!({"status_code": code, "request_id": request_id.unwrap_or_default(), "body": body});
                (
                    json!({"id": line_id, "custom_id": custom_id, "response": resp, "error": null}),
                    (200..300).contains(&code),
                )
            };
            let target = if ok {
                n_out += 1;
                &mut out
            } else {
                n_err += 1;
                &mut err
            };
            serde_json::to_writer(&mut *target, &line).map_err(|e| format!("batch store: {e}"))?;
            target.write_all(b"\n").map_err(io)?;
        }
        let out_bytes = out.finish().map_err(io)?;
        let err_bytes = err.finish().map_err(io)?;
        Ok((n_out, n_err, out_bytes, err_bytes))
    }
}

/// A buffered file writer that counts what it wrote and syncs on finish.
struct CountingWriter {
    inner: std::io::BufWriter<std::fs::File>,
    written: u64,
}

impl CountingWriter {
    fn new(file: std::fs::File) -> Self {
        Self { inner: std::io::BufWriter::new(file), written: 0 }
    }

    fn finish(self) -> std::io::Result<u64> {
        let file = self.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(self.written)
    }
}

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (Store, tempdir::TempDir) {
        let dir = tempdir::TempDir::new();
        (Store::open(dir.path()).expect("opens"), dir)
    }

    mod tempdir {
        /// A directory under the system temp dir, removed on drop.
        pub struct TempDir(std::path::PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!("batch-store-{}", uuid::Uuid::new_v4().simple()));
                std::fs::create_dir_all(&p).expect("temp dir");
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn batch(id: &str) -> BatchRow {
        BatchRow {
            id: id.into(),
            owner: "team".into(),
            input_file_id: "file-x".into(),
            endpoint: "/v1/chat/completions".into(),
            completion_window: "24h".into(),
            status: status::VALIDATING.into(),
            created_at: 1,
            expires_at: 86_401,
            ..BatchRow::default()
        }
    }

    fn lines(n: usize) -> Vec<NewLine> {
        (0..n).map(|i| NewLine { custom_id: format!("c{i}"), ord: (n - i) as i64, body: b"{}".to_vec() }).collect()
    }

    fn ok(code: u16) -> LineResult {
        LineResult { status_code: code, request_id: "r".into(), body: Some("{\"a\":1}".into()), error: None }
    }

    #[test]
    fn a_line_is_recorded_once_and_counted_once() {
        let (mut s, _dir) = store();
        s.insert_batch(&batch("b1")).expect("insert");
        s.start_batch("b1", &lines(3), 2).expect("start");
        let b = s.batch("b1", Some("team")).expect("read").expect("found");
        assert_eq!((b.status.as_str(), b.total), ("in_progress", 3));
        assert!(s.batch("b1", Some("other")).expect("read").is_none(), "another tenant sees nothing");
        let pending = s.pending_lines("b1", -1, 10).expect("pending");
        assert_eq!(pending.iter().map(|l| l.idx).collect::<Vec<_>>(), vec![2, 1, 0], "run order is ord");
        assert!(s.finish_line("b1", 2, &ok(200)).expect("finish"));
        assert!(!s.finish_line("b1", 2, &ok(500)).expect("again"), "a done line is never recorded twice");
        assert!(s.finish_line("b1", 1, &ok(400)).expect("finish"));
        let b = s.batch("b1", None).expect("read").expect("found");
        assert_eq!((b.completed, b.failed), (1, 1));
        assert_eq!(s.pending_lines("b1", -1, 10).expect("pending").len(), 1);
    }

    #[test]
    fn finalize_writes_outputs_in_input_order_and_unrun_lines_as_errors() {
        let (mut s, _dir) = store();
        s.insert_batch(&batch("b1")).expect("insert");
        s.start_batch("b1", &lines(3), 2).expect("start");
        s.finish_line("b1", 0, &ok(200)).expect("finish");
        s.finish_line("b1", 2, &ok(503)).expect("finish");
        let f = s.finalize("b1", status::CANCELLED, "batch_cancelled", 60).expect("finalize");
        let b = s.batch("b1", None).expect("read").expect("found");
        assert_eq!(b.status, "cancelled");
        assert!(b.cancelled_at.is_some());
        let out = std::fs::read_to_string(s.file_path(f.output_file_id.as_deref().expect("output"))).expect("read");
        let out: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["custom_id"], "c0");
        assert_eq!(out[0]["response"]["status_code"], 200);
        assert_eq!(out[0]["response"]["body"]["a"], 1);
        let err = std::fs::read_to_string(s.file_path(f.error_file_id.as_deref().expect("errors"))).expect("read");
        let err: Vec<Value> = err.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(err.iter().map(|l| l["custom_id"].as_str().unwrap_or("")).collect::<Vec<_>>(), vec!["c1", "c2"]);
        assert_eq!(err[0]["error"]["code"], "batch_cancelled");
        assert_eq!(err[1]["response"]["status_code"], 503);
        let file = s.file(f.output_file_id.as_deref().unwrap_or(""), Some("team")).expect("read").expect("row");
        assert_eq!(file.purpose, "batch_output");
    }

    #[test]
    fn reopening_keeps_everything_and_drops_orphan_files() {
        let dir = tempdir::TempDir::new();
        {
            let mut s = Store::open(dir.path()).expect("opens");
            s.insert_batch(&batch("b1")).expect("insert");
            s.start_batch("b1", &lines(2), 2).expect("start");
            s.finish_line("b1", 0, &ok(200)).expect("finish");
            std::fs::write(s.temp_path(), b"half an upload").expect("write");
        }
        let s = Store::open(dir.path()).expect("reopens");
        assert_eq!(s.pending_lines("b1", -1, 10).expect("pending").len(), 1);
        let left = std::fs::read_dir(dir.path().join("files")).expect("dir").count();
        assert_eq!(left, 0, "the partial upload is gone");
    }
}
