//! The management API's bearer token: where servers get it and how clients find it.
//!
//! A server (`interpose up`, every `*-svc`, `proxy-core --listen`) requires a token by default,
//! even on loopback:
//! the one given (`--token`, `--token-file`), else the one in its data directory's `token`
//! file, generated (32 random bytes, hex, mode 0600) on first start. `--no-auth` is the
//! explicit opt-out, allowed on loopback only. A client sends the token given to it, else
//! the default data directory's token when it talks to the server that data directory
//! belongs to: the default URL, or the URL `up` recorded in the data directory's `server`
//! file when it started. Any other server gets no token unless one is given, so a token is
//! never offered to a server the user did not point it at.

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::private;

/// The token file's name in a data directory.
pub const TOKEN_FILE: &str = "token";
/// The file in a data directory holding the gRPC URL `up` last served on.
pub const SERVER_FILE: &str = "server";
/// The URL clients talk to when none is given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Why no token could be settled on.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file cannot be read.
    #[error("reading the token file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The token file holds nothing.
    #[error("the token file {0} is empty")]
    Empty(PathBuf),
    /// The token file cannot be written.
    #[error("writing the token file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// `--no-auth` on an address other hosts can reach.
    #[error(
        "--no-auth is allowed on loopback only: refusing to serve the management API on {0} \
         without a token"
    )]
    NoAuthExposed(SocketAddr),
    /// `--no-auth` together with a token.
    #[error("--no-auth and a token (--token, --token-file) exclude each other")]
    Conflict,
    /// No token given and no data directory to keep one in.
    #[error(
        "{0} requires a token: pass --token or --token-file (e.g. the registry's), --data-dir \
         DIR to use (or generate) DIR/token, or --no-auth (loopback only)"
    )]
    NoToken(String),
    /// A `--token-file` of another user.
    #[error(
        "the token file {path} belongs to user {owner}, not to user {me} running this process \
         or root: refusing a token another user chose"
    )]
    Foreign { path: PathBuf, owner: u32, me: u32 },
    /// The data directory cannot be used.
    #[error(transparent)]
    DataDir(#[from] private::DataDirError),
}

/// Reads a token file: its content without surrounding whitespace, never empty.
pub fn read_file(path: &Path) -> Result<String, TokenError> {
    let text = fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_owned()));
    }
    Ok(token.to_string())
}

/// A new random token: 32 bytes from the kernel's CSPRNG, hex.
pub fn generate() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())?;
    Ok(proto::hex::encode(&bytes))
}

/// The path of `data_dir`'s token file, created (mode 0600) with a new token when missing.
/// Two processes starting at once agree on one token: the file appears whole or not at all.
pub fn load_or_create(data_dir: &Path) -> Result<PathBuf, TokenError> {
    let path = data_dir.join(TOKEN_FILE);
    if path.exists() {
        return Ok(path);
    }
    let write_err = |source| TokenError::Write {
        path: path.clone(),
        source,
    };
    let tmp = data_dir.join(format!(".{TOKEN_FILE}.tmp.{}", std::process::id()));
    let token = generate().map_err(write_err)?;
    private::write_new(&tmp, format!("{token}\n").as_bytes()).map_err(write_err)?;
    // A hard link creates the name only if it does not exist yet, with the content complete.
    let linked = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(file = %path.display(), "generated the management API token");
            Ok(path)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(write_err(e)),
    }
}

/// What a server was told about authentication: the options every gRPC server takes
/// (`interpose up`, registry-svc, intercept-svc, export-svc, proxy-core's `--listen`), the
/// same way.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AuthOptions {
    /// Bearer token every call to this server must carry (a service also sends it to the
    /// registry and intercept service it calls). Default: the one in DATA_DIR/token,
    /// generated on first start (mode 0600; the ready line names it as token=PATH).
    #[arg(long, env = "INTERPOSE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from this file instead (it must belong to you or to root).
    #[arg(long, env = "INTERPOSE_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Serve without a token (loopback only, and logged: every local user can then call the
    /// API).
    #[arg(long, conflicts_with_all = ["token", "token_file"])]
    pub no_auth: bool,
}

/// The token a server checks, and the file it came from (shown in the ready line).
#[derive(Debug, Default, Clone)]
pub struct ServerAuth {
    /// `None` only with `--no-auth`.
    pub token: Option<String>,
    /// The token file, when the token came from one.
    pub file: Option<PathBuf>,
}

impl ServerAuth {
    /// ` token=PATH` for the end of a ready line, or nothing when no file holds the token.
    pub fn ready_field(&self) -> String {
        self.file
            .as_ref()
            .map(|f| format!(" token={}", f.display()))
            .unwrap_or_default()
    }
}

impl AuthOptions {
    /// Settles the token of a server listening on `listen` with its data in `data_dir`
    /// (see [`AuthOptions::settle`]).
    pub fn resolve(self, listen: SocketAddr, data_dir: &Path) -> Result<ServerAuth, TokenError> {
        self.settle("this server", listen, Some(data_dir))
    }

    /// Settles the token of server `what` listening on `listen`, the one way every server
    /// does: `--no-auth` only on loopback (logged); else the given token, else the given
    /// file, else `data_dir`'s own token file (generated when missing); with neither a token
    /// nor a data directory the server refuses to start. `data_dir`, when given, is prepared
    /// first ([`private::prepare_data_dir`]: refused when another user owns anything in it,
    /// made private), and a token file there that other users could read is replaced by a
    /// new token (logged): whoever read it must not keep access.
    pub fn settle(
        self,
        what: &str,
        listen: SocketAddr,
        data_dir: Option<&Path>,
    ) -> Result<ServerAuth, TokenError> {
        if self.no_auth {
            if self.token.is_some() || self.token_file.is_some() {
                return Err(TokenError::Conflict);
            }
            if !listen.ip().is_loopback() {
                return Err(TokenError::NoAuthExposed(listen));
            }
        }
        if let Some(dir) = data_dir {
            use std::os::unix::fs::MetadataExt;
            // Seen before the data directory is made private, which tightens the file.
            let exposed = fs::symlink_metadata(dir.join(TOKEN_FILE))
                .is_ok_and(|m| m.is_file() && m.mode() & 0o077 != 0);
            private::prepare_data_dir(dir)?;
            if exposed {
                replace(dir)?;
            }
        }
        if self.no_auth {
            tracing::warn!(%listen, "--no-auth: {what} accepts calls without a token from every local user");
            return Ok(ServerAuth::default());
        }
        if let Some(token) = self.token.filter(|t| !t.is_empty()) {
            return Ok(ServerAuth {
                token: Some(token),
                file: None,
            });
        }
        let file = match (self.token_file, data_dir) {
            (Some(f), _) => {
                check_given_file(&f)?;
                f
            }
            (None, Some(dir)) => load_or_create(dir)?,
            (None, None) => return Err(TokenError::NoToken(what.to_string())),
        };
        Ok(ServerAuth {
            token: Some(read_file(&file)?),
            file: Some(file),
        })
    }
}

impl AuthOptions {
    /// The token given (`--token`, else `--token-file`'s), for a process that only calls
    /// servers with it; `None` when none was given.
    pub fn client_token(&self) -> Result<Option<String>, TokenError> {
        if let Some(t) = self.token.as_ref().filter(|t| !t.is_empty()) {
            return Ok(Some(t.clone()));
        }
        match &self.token_file {
            Some(f) => {
                check_given_file(f)?;
                read_file(f).map(Some)
            }
            None => Ok(None),
        }
    }
}

/// Replaces `data_dir`'s token file by one with a new token: the old one was readable by
/// other users, so whoever read it must lose access (logged as a warning).
fn replace(data_dir: &Path) -> Result<(), TokenError> {
    let path = data_dir.join(TOKEN_FILE);
    let write_err = |source| TokenError::Write {
        path: path.clone(),
        source,
    };
    let tmp = data_dir.join(format!(".{TOKEN_FILE}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let token = generate().map_err(write_err)?;
    private::write_new(&tmp, format!("{token}\n").as_bytes()).map_err(write_err)?;
    fs::rename(&tmp, &path).map_err(write_err)?;
    tracing::warn!(file = %path.display(), "the token file was readable by other users: replaced it with a new token (clients need the new one)");
    Ok(())
}

/// A `--token-file` must belong to this user or to root: a file another user owns holds a
/// token that user chose. One others can read is used, with a warning.
fn check_given_file(path: &Path) -> Result<(), TokenError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(TokenError::Foreign {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), mode = format!("{:o}", meta.mode() & 0o7777), "the token file can be read by other users: make a new token and `chmod 600` its file");
    }
    Ok(())
}

/// Records in `data_dir` the URL a server started there serves on, so that clients send
/// that data directory's token to it (and to no other server).
pub fn record_server(data_dir: &Path, url: &str) -> io::Result<()> {
    let path = data_dir.join(SERVER_FILE);
    let tmp = data_dir.join(format!(".{SERVER_FILE}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    private::write_new(&tmp, format!("{url}\n").as_bytes())?;
    fs::rename(&tmp, &path)
}

/// The token a client sends to `server`: the given one, else the given file's, else the
/// token of `default_data_dir` when `server` is the default URL or the URL recorded there.
pub fn for_client(
    token: Option<String>,
    token_file: Option<&Path>,
    server: &str,
    default_data_dir: Option<&Path>,
) -> Result<Option<String>, TokenError> {
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        return Ok(Some(t));
    }
    if let Some(f) = token_file {
        return read_file(f).map(Some);
    }
    let Some(dir) = default_data_dir else {
        return Ok(None);
    };
    let file = dir.join(TOKEN_FILE);
    if !file.exists() {
        return Ok(None);
    }
    if belongs_to(server, dir) {
        read_file(&file).map(Some)
    } else {
        Ok(None)
    }
}

/// Whether `server` is the server of data directory `dir`: the default URL, or the URL `up`
/// recorded there. Only such a server gets the directory's token or client certificate
/// without being given them.
pub fn belongs_to(server: &str, dir: &Path) -> bool {
    let same = |a: &str, b: &str| a.trim().trim_end_matches('/') == b.trim().trim_end_matches('/');
    let recorded = fs::read_to_string(dir.join(SERVER_FILE)).unwrap_or_default();
    same(server, DEFAULT_SERVER) || same(server, &recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lo() -> SocketAddr {
        "127.0.0.1:1".parse().expect("addr")
    }

    #[test]
    fn a_server_generates_one_token_per_data_dir_and_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = AuthOptions::default().resolve(lo(), dir.path()).expect("a");
        let b = AuthOptions::default().resolve(lo(), dir.path()).expect("b");
        let token = a.token.clone().expect("token");
        assert_eq!(token.len(), 64);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.token, b.token);
        let file = a.file.clone().expect("file");
        assert_eq!(file, dir.path().join(TOKEN_FILE));
        assert_eq!(a.ready_field(), format!(" token={}", file.display()));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().expect("tempdir");
        let c = AuthOptions::default()
            .resolve(lo(), other.path())
            .expect("c");
        assert_ne!(a.token, c.token);
    }

    #[test]
    fn given_tokens_win_and_no_auth_is_loopback_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let given = AuthOptions {
            token: Some("t".into()),
            ..Default::default()
        };
        let auth = given.resolve(lo(), dir.path()).expect("given");
        assert_eq!(auth.token.as_deref(), Some("t"));
        assert_eq!(auth.ready_field(), "");
        assert!(!dir.path().join(TOKEN_FILE).exists(), "none generated");

        let open = AuthOptions {
            no_auth: true,
            ..Default::default()
        };
        assert!(
            open.clone()
                .resolve(lo(), dir.path())
                .expect("lo")
                .token
                .is_none()
        );
        let any: SocketAddr = "0.0.0.0:1".parse().expect("addr");
        let err = open.resolve(any, dir.path()).expect_err("exposed");
        assert!(err.to_string().contains("loopback only"), "{err}");

        let missing = AuthOptions {
            token_file: Some(dir.path().join("nope")),
            ..Default::default()
        };
        let err = missing.resolve(lo(), dir.path()).expect_err("missing");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn a_client_sends_the_default_token_only_to_its_own_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Some(dir.path());
        assert_eq!(
            for_client(None, None, DEFAULT_SERVER, d).expect("none"),
            None
        );
        let file = load_or_create(dir.path()).expect("create");
        let token = read_file(&file).expect("read");
        assert_eq!(
            for_client(None, None, DEFAULT_SERVER, d).expect("default"),
            Some(token.clone())
        );
        let other = "http://127.0.0.1:40000";
        assert_eq!(for_client(None, None, other, d).expect("other"), None);
        record_server(dir.path(), other).expect("record");
        assert_eq!(
            for_client(None, None, "http://127.0.0.1:40000/", d).expect("recorded"),
            Some(token)
        );
        assert_eq!(
            for_client(Some("x".into()), Some(&file), other, d).expect("given"),
            Some("x".into())
        );
    }
}
