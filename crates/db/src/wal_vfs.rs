//! A SQLite VFS that hands a transaction's WAL frames to the kernel in one
//! write instead of two per frame.
//!
//! SQLite appends each WAL frame with two `pwrite` calls (its 24-byte header,
//! then the page), and a 4,120-byte frame straddles the file's 4 KiB pages,
//! so a frame costs the kernel two system calls and three page-cache
//! updates. A group commit of 18 messages on 18 chats writes ~22 frames. This
//! VFS wraps the platform's default one ("unix") and, for WAL files only,
//! gathers writes that continue (or overwrite) the pending run of bytes in
//! memory; the run goes to the file (one `pwrite` per 124 KiB) before
//! anything that could observe the file: a sync, a read, a size query or
//! change, a file control, closing, a write elsewhere, or 1 MiB of pending
//! bytes. Every other file (the database, its shared-memory index) is the
//! default VFS's own. A file object belongs to one connection, which SQLite
//! calls from one thread at a time, so the pending run needs no lock.
//!
//! **Only for connections with `synchronous = FULL`** (which
//! [`crate::Db::sqlite_commit_connection`] sets and checks). With FULL, SQLite
//! syncs the WAL at every commit *before* it publishes the new frames in the
//! wal-index (`sqlite3WalFrames` in SQLite's wal.c), so the frames are in the
//! file before any other connection can look for them. With NORMAL there is
//! no sync at commit and other connections would read frames still pending
//! here.
//!
//! See <https://sqlite.org/vfs.html> and <https://sqlite.org/walformat.html>.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name this VFS is registered under.
pub(crate) const NAME: &CStr = c"natter-wal-gather";

/// Pending bytes beyond which a write goes to the file at once.
const MAX_PENDING: usize = 1 << 20;

/// Most bytes handed to the default VFS's `xWrite` at once: the unix VFS
/// takes fewer than 128 KiB per call (`seekAndWriteFd` in SQLite's
/// os_unix.c masks the length with `0x1ffff`).
const MAX_WRITE: usize = 124 * 1024;

/// Our file object: SQLite allocates `szOsFile` bytes for it, i.e. this
/// header followed by the default VFS's own file object.
#[repr(C)]
struct GatherFile {
    base: ffi::sqlite3_file,
    /// File offset of `pending[0]`.
    start: i64,
    pending: Vec<u8>,
}

/// The default VFS's file object, stored right after our header.
unsafe fn real(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { (file as *mut u8).add(size_of::<GatherFile>()) as *mut ffi::sqlite3_file }
}

unsafe fn real_methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    unsafe { &*(*real(file)).pMethods }
}

/// Writes the pending run, if any, to the file with one call.
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let this = &mut *(file as *mut GatherFile);
        if this.pending.is_empty() {
            return ffi::SQLITE_OK;
        }
        let write = real_methods(file).xWrite.expect("xWrite");
        let mut rc = ffi::SQLITE_OK;
        let mut offset = this.start;
        for chunk in this.pending.chunks(MAX_WRITE) {
            rc = write(real(file), chunk.as_ptr() as *const c_void, chunk.len() as c_int, offset);
            #[cfg(test)]
            tests::WRITES.with(|n| n.set(n.get() + 1));
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += chunk.len() as i64;
        }
        // On failure SQLite abandons the transaction: its frames lie beyond
        // the committed end of the WAL and are never read.
        this.pending.clear();
        rc
    }
}

unsafe extern "C" fn x_write(file: *mut ffi::sqlite3_file, buf: *const c_void, amt: c_int, offset: i64) -> c_int {
    unsafe {
        let this = &mut *(file as *mut GatherFile);
        let bytes = std::slice::from_raw_parts(buf as *const u8, amt.max(0) as usize);
        let end = this.start + this.pending.len() as i64;
        if this.pending.is_empty() || offset < this.start || offset > end {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            this.start = offset;
        }
        // Continue the run or overwrite part of it (SQLite rewrites a frame
        // of the open transaction when it changes the same page again).
        let at = (offset - this.start) as usize;
        let overlap = (this.pending.len() - at).min(bytes.len());
        this.pending[at..at + overlap].copy_from_slice(&bytes[..overlap]);
        this.pending.extend_from_slice(&bytes[overlap..]);
        if this.pending.len() >= MAX_PENDING { flush(file) } else { ffi::SQLITE_OK }
    }
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let flushed = flush(file);
        let closed = real_methods(file).xClose.map_or(ffi::SQLITE_OK, |close| close(real(file)));
        std::ptr::drop_in_place(&mut (*(file as *mut GatherFile)).pending);
        if flushed != ffi::SQLITE_OK { flushed } else { closed }
    }
}

unsafe extern "C" fn x_read(file: *mut ffi::sqlite3_file, buf: *mut c_void, amt: c_int, offset: i64) -> c_int {
    unsafe {
        match flush(file) {
            ffi::SQLITE_OK => real_methods(file).xRead.expect("xRead")(real(file), buf, amt, offset),
            rc => rc,
        }
    }
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    unsafe {
        match flush(file) {
            ffi::SQLITE_OK => real_methods(file).xTruncate.expect("xTruncate")(real(file), size),
            rc => rc,
        }
    }
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        match flush(file) {
            ffi::SQLITE_OK => real_methods(file).xSync.expect("xSync")(real(file), flags),
            rc => rc,
        }
    }
}

unsafe extern "C" fn x_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    unsafe {
        match flush(file) {
            ffi::SQLITE_OK => real_methods(file).xFileSize.expect("xFileSize")(real(file), size),
            rc => rc,
        }
    }
}

unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { real_methods(file).xLock.expect("xLock")(real(file), level) }
}

unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { real_methods(file).xUnlock.expect("xUnlock")(real(file), level) }
}

unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe { real_methods(file).xCheckReservedLock.expect("xCheckReservedLock")(real(file), out) }
}

unsafe extern "C" fn x_file_control(file: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    unsafe {
        match flush(file) {
            ffi::SQLITE_OK => real_methods(file).xFileControl.expect("xFileControl")(real(file), op, arg),
            rc => rc,
        }
    }
}

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { real_methods(file).xSectorSize.expect("xSectorSize")(real(file)) }
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { real_methods(file).xDeviceCharacteristics.expect("xDeviceCharacteristics")(real(file)) }
}

/// Methods of a WAL file: version 1, so SQLite never asks a WAL file for
/// shared memory or memory-mapped pages (it asks only the database file).
static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// The default VFS this one wraps, once registered.
struct Registered {
    default: *mut ffi::sqlite3_vfs,
}

// SAFETY: SQLite's VFS objects are immutable once registered and their
// methods are thread-safe (as SQLite requires of every VFS).
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

static REGISTERED: OnceLock<Result<Registered, c_int>> = OnceLock::new();

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(Ok(registered)) = REGISTERED.get() else { return ffi::SQLITE_ERROR };
    unsafe {
        let default = &*registered.default;
        let open = default.xOpen.expect("xOpen");
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            // Not a WAL file: the default VFS's own object, at the start of
            // our (larger) allocation.
            return open(registered.default, name, file, flags, out_flags);
        }
        (*file).pMethods = std::ptr::null();
        let rc = open(registered.default, name, real(file), flags, out_flags);
        if rc != ffi::SQLITE_OK {
            // SQLite closes only what carries methods: close the inner file
            // ourselves if it got that far.
            let inner = real(file);
            if !(*inner).pMethods.is_null()
                && let Some(close) = (*(*inner).pMethods).xClose
            {
                close(inner);
            }
            return rc;
        }
        std::ptr::write(
            file as *mut GatherFile,
            GatherFile { base: ffi::sqlite3_file { pMethods: &METHODS }, start: 0, pending: Vec::new() },
        );
        ffi::SQLITE_OK
    }
}

/// Registers the VFS (once per process; not as the default) and returns
/// its name for `Connection::open_with_flags_and_vfs`.
///
/// Errors: SQLite has no default VFS or refuses the registration (its
/// result code).
pub(crate) fn register() -> Result<&'static CStr, c_int> {
    let registered = REGISTERED.get_or_init(|| unsafe {
        let default = ffi::sqlite3_vfs_find(std::ptr::null());
        if default.is_null() {
            return Err(ffi::SQLITE_ERROR);
        }
        // Every method but xOpen is the default VFS's own, which ignore the
        // VFS pointer they are given or read only what is copied here.
        let mut vfs = *default;
        vfs.szOsFile = (size_of::<GatherFile>() as c_int) + (*default).szOsFile;
        vfs.pNext = std::ptr::null_mut();
        vfs.zName = NAME.as_ptr() as *const c_char;
        vfs.xOpen = Some(x_open);
        let vfs = Box::leak(Box::new(vfs));
        let rc = ffi::sqlite3_vfs_register(vfs, 0);
        if rc == ffi::SQLITE_OK { Ok(Registered { default }) } else { Err(rc) }
    });
    registered.as_ref().map(|_| NAME).map_err(|rc| *rc)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use rusqlite::{Connection, OpenFlags, params};

    thread_local! {
        /// Writes that reached a WAL file through this VFS on this thread.
        pub(super) static WRITES: Cell<usize> = const { Cell::new(0) };
    }

    /// A fresh directory (removed when dropped) and a database path in it.
    fn fresh_db() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        (dir, path)
    }

    fn open(path: &std::path::Path, gather: bool) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = if gather {
            Connection::open_with_flags_and_vfs(path, flags, super::register().unwrap()).unwrap()
        } else {
            Connection::open_with_flags(path, flags).unwrap()
        };
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;").unwrap();
        conn
    }

    /// What a reader on the default VFS sees: rows and total blob bytes.
    fn seen(reader: &Connection) -> (i64, i64) {
        reader
            .query_row("SELECT COUNT(*), COALESCE(SUM(LENGTH(v)), 0) FROM t", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
    }

    #[test]
    fn other_connections_see_every_commit_and_nothing_else() {
        let (_dir, path) = fresh_db();
        let mut writer = open(&path, true);
        // A tiny page cache: big transactions spill pages into the WAL
        // before they commit and then rewrite those frames.
        writer
            .execute_batch("PRAGMA cache_size = 8; CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);")
            .unwrap();
        let reader = open(&path, false);
        let (mut rows, mut bytes) = (0i64, 0i64);
        for round in 0..200i64 {
            let tx = writer.transaction().unwrap();
            // Small commits, a few that exceed the 1 MiB run, and updates of
            // old rows (pages far back in the file).
            let n = if round % 50 == 7 { 600 } else { round % 20 + 1 };
            for i in 0..n {
                let len = 500 + ((round * 31 + i * 7) % 3000);
                tx.execute("INSERT INTO t (k, v) VALUES (?1, zeroblob(?2))", params![rows + i + 1, len]).unwrap();
                bytes += len;
            }
            if rows > 0 {
                tx.execute("UPDATE t SET v = zeroblob(100) WHERE k = ?1", [round % rows + 1]).unwrap();
                bytes = 0;
            }
            if round % 9 == 4 {
                // Rolled back: its frames (if any reached the WAL) are never seen.
                tx.rollback().unwrap();
                let tx = writer.transaction().unwrap();
                tx.execute("INSERT INTO t (k, v) VALUES (?1, zeroblob(10))", [rows + 1]).unwrap();
                tx.commit().unwrap();
                rows += 1;
            } else {
                tx.commit().unwrap();
                rows += n;
            }
            let (count, total) = seen(&reader);
            assert_eq!(count, rows, "round {round}");
            if bytes > 0 {
                assert_eq!(total, bytes, "round {round}");
            }
            bytes = total;
            if round % 40 == 39 {
                // The WAL starts over from its header.
                reader.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
            }
        }
        let check: String = reader.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        drop(writer);
        drop(reader);
        assert_eq!(seen(&open(&path, false)).0, rows);
    }

    #[test]
    fn a_commit_reaches_the_wal_in_one_write() {
        let (_dir, path) = fresh_db();
        let mut writer = open(&path, true);
        writer.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);").unwrap();
        // ~40 pages of new rows (~165 KB of frames): ~80 writes on the
        // default VFS, two of at most 124 KiB here.
        let tx = writer.transaction().unwrap();
        let before = WRITES.with(Cell::get);
        for k in 0..40 {
            tx.execute("INSERT INTO t (k, v) VALUES (?1, zeroblob(4000))", [k]).unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(WRITES.with(Cell::get) - before, 2);
        let reader = open(&path, false);
        assert_eq!(seen(&reader), (40, 160_000));
    }
}
