//! The durable usage ledger: one SQLite row per committed request.
//!
//! # Interface
//!
//! ```text
//! let ledger = Ledger::open(&cfg.budget.ledger)?;          // creates file + schema
//! ledger::rebuild(&cfg.budget.ledger.path, &budget, now)?;  // before serving
//! ledger.record(UsageRecord { .. });   // per request, after budget.commit; never blocks on disk
//! ledger.close()?;                     // clean stop: everything recorded is on disk
//! ledger::usage_report(path, from, to)? + format_usage_table(&rows)   // `kedge usage`
//! ```
//!
//! # Durability
//!
//! `record` queues the row for a dedicated writer thread, which writes every
//! row queued within one group-commit window (`group_commit_ms`, default 20)
//! in a single transaction (WAL, `synchronous = FULL`). A row is therefore on
//! disk at most one window plus one transaction after `record` returned; a
//! process killed outright loses at most that. `flush` writes what is queued
//! at once and waits; `close` (and `Drop`) flush before the thread ends. A
//! failed write (disk full, …) is logged, kept and retried every window.
//!
//! SQLite is built from source (`rusqlite`'s `bundled`): a few seconds of C
//! compile once buys the same SQLite on every host and CI without a system
//! library or header to install.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, params};
use serde::Deserialize;
use toml::Spanned;

use crate::budget::{Budget, BudgetConfigError, RestoredUsage, Usage, format_dollars};

/// `[budget.ledger]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The SQLite file (created with its directory if missing).
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Rows queued within this many milliseconds share one transaction.
    #[serde(default = "default_window")]
    pub group_commit_ms: Spanned<u64>,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            path: default_path(),
            group_commit_ms: default_window(),
        }
    }
}

/// `$STATE_DIRECTORY/ledger.sqlite` (systemd's `StateDirectory=`), else
/// `/var/lib/kedge/ledger.sqlite`.
fn default_path() -> PathBuf {
    let dir = std::env::var_os("STATE_DIRECTORY")
        .and_then(|d| {
            d.to_str()
                .and_then(|d| d.split(':').next())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/kedge"));
    dir.join("ledger.sqlite")
}

fn default_window() -> Spanned<u64> {
    Spanned::new(0..0, 20)
}

/// Longest group-commit window accepted: past it a crash loses too much.
pub const MAX_GROUP_COMMIT_MS: u64 = 10_000;

impl LedgerConfig {
    pub fn window(&self) -> Duration {
        Duration::from_millis(*self.group_commit_ms.get_ref())
    }

    pub(crate) fn validate(&self) -> Vec<BudgetConfigError> {
        let ms = *self.group_commit_ms.get_ref();
        if ms == 0 || ms > MAX_GROUP_COMMIT_MS {
            let span = self.group_commit_ms.span();
            return vec![BudgetConfigError {
                span: (span != (0..0)).then_some(span),
                message: format!("group_commit_ms must be between 1 and {MAX_GROUP_COMMIT_MS}"),
                hint: Some("it bounds what a crash can lose; tens of milliseconds is usual".into()),
            }];
        }
        Vec::new()
    }
}

/// One committed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub request_id: String,
    pub tenant: String,
    /// The API key's id, never the secret.
    pub api_key: Option<String>,
    /// The API route, e.g. `/v1/chat/completions`.
    pub route: String,
    pub backend: String,
    pub model: String,
    pub usage: Usage,
    /// When the budget reservation was taken: the window the usage belongs to.
    pub started: Timestamp,
    pub finished: Timestamp,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT    NOT NULL,
    tenant            TEXT    NOT NULL,
    api_key           TEXT,
    route             TEXT    NOT NULL,
    backend           TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    cost_micros       INTEGER NOT NULL,
    started_ns        INTEGER NOT NULL,  -- Unix time, nanoseconds
    finished_ns       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_started ON usage (started_ns);
";

const INSERT: &str = "INSERT INTO usage (request_id, tenant, api_key, route, backend, model,
    prompt_tokens, completion_tokens, cached_tokens, cost_micros, started_ns, finished_ns)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// Counters of the writer, for `/metrics` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Rows on disk (written by this process).
    pub rows: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// Writes that failed and will be retried.
    pub failures: u64,
    /// How long the last transaction took to commit (fsync included).
    pub last_commit: Duration,
}

#[derive(Default)]
struct Counters {
    rows: AtomicU64,
    transactions: AtomicU64,
    failures: AtomicU64,
    last_commit_nanos: AtomicU64,
}

/// What the request path hands the writer thread. A row wakes the writer only
/// when it opens a window (the queue was empty); rows inside the window just
/// queue, so a busy proxy pays one wake-up per window, not one per request.
#[derive(Default)]
struct Queue {
    rows: Vec<UsageRecord>,
    flushes: Vec<mpsc::SyncSender<Result<(), String>>>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer side of the ledger. `Send + Sync`: share it in an `Arc`.
pub struct Ledger {
    shared: Arc<Shared>,
    writer: Option<thread::JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Ledger {
    /// Opens (or creates) the ledger and starts its writer thread.
    pub fn open(config: &LedgerConfig) -> anyhow::Result<Ledger> {
        let conn = open_writer(&config.path)?;
        let shared = Arc::new(Shared::default());
        let counters = Arc::new(Counters::default());
        let window = config.window();
        let (s, c) = (shared.clone(), counters.clone());
        let writer = thread::Builder::new()
            .name("kedge-ledger".into())
            .spawn(move || write_loop(conn, &s, window, &c))
            .context("cannot start the ledger writer thread")?;
        Ok(Ledger {
            shared,
            writer: Some(writer),
            counters,
        })
    }

    /// Queues one row; it is on disk within one group-commit window.
    pub fn record(&self, record: UsageRecord) {
        let mut q = self.shared.lock();
        if q.closed {
            tracing::error!("ledger is closed; a usage row was not recorded");
            return;
        }
        let opens_window = q.rows.is_empty();
        q.rows.push(record);
        drop(q);
        if opens_window {
            self.shared.wake.notify_one();
        }
    }

    /// Writes everything queued so far, now, and waits until it is on disk.
    pub fn flush(&self) -> anyhow::Result<()> {
        let (ack, done) = mpsc::sync_channel(1);
        {
            let mut q = self.shared.lock();
            anyhow::ensure!(!q.closed, "ledger is closed");
            q.flushes.push(ack);
        }
        self.shared.wake.notify_one();
        done.recv()
            .context("ledger writer is gone")?
            .map_err(|e| anyhow::anyhow!("ledger write failed: {e}"))
    }

    /// Flushes and stops the writer: the clean stop, which loses nothing.
    pub fn close(mut self) -> anyhow::Result<()> {
        let flushed = self.flush();
        self.stop();
        flushed
    }

    fn stop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            tracing::error!("ledger writer thread panicked");
        }
    }

    pub fn stats(&self) -> LedgerStats {
        LedgerStats {
            rows: self.counters.rows.load(Ordering::Relaxed),
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
            last_commit: Duration::from_nanos(
                self.counters.last_commit_nanos.load(Ordering::Relaxed),
            ),
        }
    }
}

impl Drop for Ledger {
    /// The writer drains its queue when closed, so a dropped ledger also loses
    /// nothing (unless the process dies first).
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_writer(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the ledger directory {}", dir.display()))?;
    }
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open the ledger {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)
        .with_context(|| format!("cannot create the ledger schema in {}", path.display()))?;
    Ok(conn)
}

fn write_loop(mut conn: Connection, shared: &Shared, window: Duration, counters: &Counters) {
    // A window's inserts are a burst of CPU work (about a microsecond a row)
    // that no client waits on. At nice 10 this thread yields to the threads
    // serving requests when they share a core, instead of adding its burst to
    // their tail latency; under contention the window stretches, it is not
    // lost. (Linux applies the nice value to this thread only.)
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
    loop {
        let mut q = shared.lock();
        while q.rows.is_empty() && q.flushes.is_empty() && !q.closed {
            q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        // A window opened: let it fill, unless a flush or the close cuts it short.
        let deadline = Instant::now() + window;
        while q.flushes.is_empty() && !q.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = shared
                .wake
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let batch = std::mem::take(&mut q.rows);
        let waiters = std::mem::take(&mut q.flushes);
        let closed = q.closed;
        drop(q);

        let started = Instant::now();
        let result = write_batch(&mut conn, &batch).map_err(|e| e.to_string());
        match &result {
            Ok(()) if !batch.is_empty() => {
                counters
                    .last_commit_nanos
                    .store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                counters
                    .rows
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                counters.transactions.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {}
            Err(e) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(rows = batch.len(), "ledger write failed, retrying: {e}");
                // Back in front of anything newer; the next window retries.
                let mut q = shared.lock();
                let newer = std::mem::replace(&mut q.rows, batch);
                q.rows.extend(newer);
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
        if closed {
            let left = shared.lock().rows.len();
            if left > 0 {
                tracing::error!(rows = left, "ledger closed with unwritten rows");
            }
            return;
        }
    }
}

fn nanos(t: Timestamp) -> i64 {
    i64::try_from(t.as_nanosecond()).unwrap_or(i64::MAX)
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn write_batch(conn: &mut Connection, batch: &[UsageRecord]) -> rusqlite::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(INSERT)?;
        for r in batch {
            insert.execute(params![
                r.request_id,
                r.tenant,
                r.api_key,
                r.route,
                r.backend,
                r.model,
                int(r.usage.prompt_tokens),
                int(r.usage.completion_tokens),
                int(r.usage.cached_tokens),
                int(r.usage.cost_micros),
                nanos(r.started),
                nanos(r.finished),
            ])?;
        }
    }
    tx.commit()
}

fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open the ledger {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Feeds the current windows of `budget` from the ledger at `path` (call on
/// start, after [`Ledger::open`], before serving). Returns the rows read back.
pub fn rebuild(path: &Path, budget: &Budget, now: Timestamp) -> anyhow::Result<u64> {
    let plan = budget.restore_plan(now);
    let conn = open_reader(path)?;
    // Aggregates never span a calendar boundary (the second group term) nor
    // mix grains: whole segments before `minutes_from`, minutes before
    // `rows_from`, single rows after.
    let mut query = conn.prepare(
        "SELECT tenant, api_key, backend, COUNT(*), SUM(prompt_tokens + completion_tokens),
                SUM(cost_micros), MAX(started_ns)
         FROM usage WHERE started_ns >= ?1
         GROUP BY tenant, api_key, backend,
                  (started_ns >= ?2) + (started_ns >= ?3),
                  (started_ns >= ?4) + (started_ns >= ?5),
                  CASE WHEN started_ns >= ?5 THEN id
                       WHEN started_ns >= ?4 THEN started_ns / 60000000000
                       ELSE 0 END",
    )?;
    let mut rows = 0u64;
    let history = query
        .query_map(
            params![
                nanos(plan.since),
                nanos(plan.month_start),
                nanos(plan.day_start),
                nanos(plan.minutes_from),
                nanos(plan.rows_from),
            ],
            |row| {
                let count: i64 = row.get(3)?;
                let at: i64 = row.get(6)?;
                Ok((
                    count,
                    RestoredUsage {
                        tenant: row.get(0)?,
                        api_key: row.get(1)?,
                        backend: row.get(2)?,
                        at: Timestamp::from_nanosecond(at as i128).unwrap_or(Timestamp::MIN),
                        requests: count as u64,
                        tokens: row.get::<_, i64>(4)?.max(0) as u64,
                        cost_micros: row.get::<_, i64>(5)?.max(0) as u64,
                    },
                ))
            },
        )?
        .map(|r| {
            r.map(|(count, u)| {
                rows += count as u64;
                u
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read the ledger {}", path.display()))?;
    budget.restore(history, now);
    Ok(rows)
}

/// Spend of one tenant on one route over a period.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub tenant: String,
    pub route: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cost_micros: u64,
}

/// Spend per tenant and route of the requests started in `[from, to)`,
/// sorted by tenant then route.
pub fn usage_report(path: &Path, from: Timestamp, to: Timestamp) -> anyhow::Result<Vec<UsageRow>> {
    let conn = open_reader(path)?;
    let mut query = conn.prepare(
        "SELECT tenant, route, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
                SUM(cached_tokens), SUM(cost_micros)
         FROM usage WHERE started_ns >= ?1 AND started_ns < ?2
         GROUP BY tenant, route ORDER BY tenant, route",
    )?;
    let rows = query
        .query_map(params![nanos(from), nanos(to)], |row| {
            let n = |i| row.get::<_, i64>(i).map(|v| v.max(0) as u64);
            Ok(UsageRow {
                tenant: row.get(0)?,
                route: row.get(1)?,
                requests: n(2)?,
                prompt_tokens: n(3)?,
                completion_tokens: n(4)?,
                cached_tokens: n(5)?,
                cost_micros: n(6)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read the ledger {}", path.display()))?;
    Ok(rows)
}

/// The rows as an aligned text table with a total line.
pub fn format_usage_table(rows: &[UsageRow]) -> String {
    let header = [
        "TENANT",
        "ROUTE",
        "REQUESTS",
        "PROMPT",
        "COMPLETION",
        "CACHED",
        "COST",
    ];
    let line = |r: &UsageRow| {
        [
            r.tenant.clone(),
            r.route.clone(),
            r.requests.to_string(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.cached_tokens.to_string(),
            format_dollars(r.cost_micros),
        ]
    };
    let total = rows.iter().fold(
        UsageRow {
            tenant: "TOTAL".into(),
            ..UsageRow::default()
        },
        |mut t, r| {
            t.requests += r.requests;
            t.prompt_tokens += r.prompt_tokens;
            t.completion_tokens += r.completion_tokens;
            t.cached_tokens += r.cached_tokens;
            t.cost_micros += r.cost_micros;
            t
        },
    );
    let mut table: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    table.extend(rows.iter().map(line));
    table.push(line(&total));
    let widths: Vec<usize> = (0..7)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        for (c, cell) in row.iter().enumerate() {
            let w = widths[c];
            // Names left-aligned, numbers right-aligned.
            let gap = if c == 0 { "" } else { "  " };
            let _ = if c < 2 {
                write!(out, "{gap}{cell:<w$}")
            } else {
                write!(out, "{gap}{cell:>w$}")
            };
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
