//! `-t`: is everything the configuration names usable, as the daemon will meet it?
//!
//! Creates nothing. Started as root with `user` set, the paths are checked by a child
//! process that has dropped to that user, since that is who opens them after start-up
//! and on every reload; folders start-up itself creates (as root) are allowed to be
//! missing as long as that user can reach the place they will be made.

use super::{drop_privileges, target_user};
use crate::config::{Config, LogTarget, Transport};
use nix::unistd::{access, AccessFlags, ForkResult, User};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The first 16 bytes of every SQLite 3 database.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Checks `cfg`; `Ok` carries the warnings (allowed, but probably a mistake).
pub fn check(cfg: &Config) -> Result<Vec<String>, String> {
    crate::listen::resolve(&cfg.host, cfg.port).map_err(|e| format!("host: {e}"))?;
    if !cfg.user.is_empty() {
        match User::from_name(&cfg.user) {
            Ok(Some(_)) => {}
            _ => return Err(format!("user \"{}\": no such user", cfg.user)),
        }
    }
    // As start-up reads them: before the privilege drop.
    let mail = cfg.mail_settings()?;
    crate::transport::Mailer::new(&mail).map_err(|e| e.to_string())?;
    match target_user(cfg)? {
        Some(user) => as_user(&user, || paths(cfg, Some(&user)))?,
        None => paths(cfg, None)?,
    }
    Ok(cfg.warnings())
}

/// Runs `f` in a child process that has switched to `user`; its error comes back as text.
fn as_user(user: &User, f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let (rx, tx) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: `notifd -t` is single-threaded; the child runs the checks and exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(rx);
            let result = drop_privileges(user).and_then(|()| f());
            let why = result.err().unwrap_or_default();
            let _ = fs::File::from(tx).write_all(why.as_bytes());
            // SAFETY: _exit skips the parent's atexit handlers and buffers, which the
            // child must not run twice.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(tx);
            let mut why = String::new();
            let read = fs::File::from(rx).read_to_string(&mut why);
            let status = nix::sys::wait::waitpid(child, None);
            match (read, status) {
                (Ok(_), Ok(nix::sys::wait::WaitStatus::Exited(_, 0))) if why.is_empty() => Ok(()),
                (Ok(_), _) if !why.is_empty() => Err(why),
                _ => Err(format!("the check as user \"{}\" did not finish", user.name)),
            }
        }
    }
}

/// The paths, checked by whoever will use them: `user` after the drop (this process
/// already runs as `user` then), or the current user.
fn paths(cfg: &Config, user: Option<&User>) -> Result<(), String> {
    let who = match user {
        Some(u) => format!("user \"{}\"", u.name),
        None => "this user".to_string(),
    };
    // Reread on every reload, after the drop.
    if let Some(file) = &cfg.file {
        fs::read(file)
            .map_err(|e| format!("{who} cannot read the configuration (a reload would fail): {e}"))?;
    }
    for (key, file) in [
        ("publish_token_file", &cfg.publish_token_file),
        ("smtp_password_file", &cfg.smtp_password_file),
        ("smtp_ca_file", &cfg.smtp_ca_file),
    ] {
        if let Some(file) = file {
            fs::read(file).map_err(|e| {
                format!("{key} {}: {who} cannot read it (a reload would fail): {e}", file.display())
            })?;
        }
    }
    // Loaded as a reload loads them: by `user`, the key checked against the certificate.
    crate::tls::check(cfg)?;
    // Start-up makes missing folders as root when it will drop to `user`.
    let root_makes = user.is_some();
    database(&cfg.database, root_makes).map_err(|e| format!("database {}: {e}", cfg.database.display()))?;
    match cfg.mail_transport {
        Transport::Spool => folder(&cfg.spool_dir, root_makes)
            .map_err(|e| format!("spool_dir {}: {e}", cfg.spool_dir.display()))?,
        Transport::Sendmail => {
            let ok = fs::metadata(&cfg.sendmail_path).is_ok_and(|m| m.is_file())
                && access(&cfg.sendmail_path, AccessFlags::X_OK).is_ok();
            if !ok {
                return Err(format!(
                    "sendmail_path {}: not an executable file for {who}",
                    cfg.sendmail_path.display()
                ));
            }
        }
        Transport::Smtp | Transport::None => {}
    }
    if let Some(LogTarget::File(log)) = &cfg.log {
        log_file(log, root_makes).map_err(|e| format!("log {}: {e}", log.display()))?;
    }
    Ok(())
}

/// The nearest part of `path` that exists (`path` itself or a folder above it), after
/// checking that no existing part is a file where a folder must be.
fn existing_part(path: &Path) -> Result<&Path, String> {
    let mut p = path;
    let mut denied = false;
    loop {
        match fs::metadata(p) {
            // The nearest folder that can be looked at cannot be entered.
            Ok(_) if denied => return Err(format!("cannot enter {}: permission denied", p.display())),
            Ok(m) if p == path || m.is_dir() => return Ok(p),
            Ok(_) => return Err(format!("{} is a file, not a folder", p.display())),
            // ENOTDIR: a part further up is a file; it is found on the way up.
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => denied = true,
            Err(e) => return Err(format!("cannot reach {}: {e}", p.display())),
        }
        p = match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ if p != Path::new(".") => Path::new("."),
            _ => return Err(format!("no folder of {} exists", path.display())),
        };
    }
}

/// A folder notifd writes in: there, or creatable.
fn folder(dir: &Path, root_makes: bool) -> Result<(), String> {
    let found = existing_part(dir)?;
    if found == dir {
        if !fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
            return Err("not a folder".into());
        }
        return writable(dir);
    }
    reachable(found, root_makes)
}

/// Where a missing folder will be made: start-up as root only needs `user` to be able
/// to pass through `found`; otherwise this user must be able to create in it.
fn reachable(found: &Path, root_makes: bool) -> Result<(), String> {
    if root_makes {
        access(found, AccessFlags::X_OK).map_err(|e| format!("cannot enter {}: {e}", found.display()))
    } else {
        writable(found).map_err(|e| format!("cannot create the missing folders: {e}"))
    }
}

fn writable(dir: &Path) -> Result<(), String> {
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| format!("cannot create files in {}: {e}", dir.display()))
}

/// The database file: a place to create it, or an SQLite database that is notifd's.
fn database(path: &Path, root_makes: bool) -> Result<(), String> {
    let found = existing_part(path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if found != path {
        return if found == dir { writable(dir) } else { reachable(found, root_makes) };
    }
    let meta = fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    access(path, AccessFlags::R_OK | AccessFlags::W_OK)
        .map_err(|e| format!("cannot read and write it: {e}"))?;
    // The -wal, -shm and lock files go beside it.
    writable(dir)?;
    if meta.len() == 0 {
        return Ok(()); // SQLite makes an empty file a new database
    }
    let mut head = [0u8; 16];
    let mut file = fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    if file.read_exact(&mut head).is_err() || &head != SQLITE_MAGIC {
        return Err("exists and is not an SQLite database".into());
    }
    let tables = tables(path).map_err(|e| format!("cannot read it as an SQLite database: {e}"))?;
    if !tables.is_empty() && !tables.iter().any(|t| t == "subscriptions") {
        return Err(format!(
            "an SQLite database with tables ({}) but no \"subscriptions\" table: not notifd's",
            tables.join(", ")
        ));
    }
    Ok(())
}

/// The tables of the database at `path`, read without writing or creating anything:
/// immutable unless a -wal file says it is in use (then its -shm is there to read).
fn tables(path: &Path) -> Result<Vec<String>, rusqlite::Error> {
    use rusqlite::OpenFlags;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let flags =
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let uri =
        format!("file:{}{}", uri_path(path), if Path::new(&wal).exists() { "" } else { "?immutable=1" });
    let db = rusqlite::Connection::open_with_flags(uri, flags)?;
    let mut stmt = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

/// `path` for a `file:` URI: every byte but unreserved ones and `/` percent-encoded.
fn uri_path(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = String::new();
    for &b in abs.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The log file: a regular file of the user notifd runs as (never a link), or a place
/// to create one.
fn log_file(path: &Path, root_makes: bool) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err("a symbolic link; notifd refuses to follow it".into()),
        Ok(m) if !m.is_file() => Err("not a regular file".into()),
        Ok(m) if m.uid() != nix::unistd::geteuid().as_raw() => {
            Err(format!("belongs to uid {}, not to the user notifd runs as", m.uid()))
        }
        Ok(_) => access(path, AccessFlags::W_OK).map_err(|e| format!("cannot write to it: {e}")),
        Err(_) => {
            let found = existing_part(path)?;
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if found != dir {
                return Err(format!("its folder {} does not exist", dir.display()));
            }
            if root_makes {
                access(dir, AccessFlags::X_OK).map_err(|e| format!("cannot enter {}: {e}", dir.display()))
            } else {
                writable(dir)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_existing_part_stops_at_a_file_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("blocker"), "x").unwrap();
        assert_eq!(existing_part(&root.join("a/b/c.db")).unwrap(), root);
        assert_eq!(existing_part(&root.join("blocker")).unwrap(), root.join("blocker"));
        let e = existing_part(&root.join("blocker/x/c.db")).unwrap_err();
        assert!(e.ends_with("blocker is a file, not a folder"), "{e}");
    }

    #[test]
    fn uri_paths_escape_what_a_uri_would_read() {
        assert_eq!(uri_path(Path::new("/a b/c?d#e%f.db")), "/a%20b/c%3Fd%23e%25f.db");
    }

    #[test]
    fn tables_are_read_without_creating_anything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE b(x); CREATE TABLE a(x);").unwrap();
        drop(db);
        let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(tables(&path).unwrap(), ["a", "b"]);
        let after: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(before, after);
    }
}
