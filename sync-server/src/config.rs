//! The command line, and the relay's settings.
//!
//! `converge-server [FLAGS]` (or `converge-server serve [FLAGS]`) runs the
//! relay; with the feature `bench`, `bench-storage` and `bench-populate`
//! are benchmark tools (see `storage_bench`). The relay's settings come from
//! command-line flags, then environment variables (`CONVERGE_*`), then the
//! TOML file given by `--config`, then defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use converge_core::engine::ReplicaKind;
use serde::Deserialize;

#[cfg(feature = "bench")]
use crate::storage_bench;

/// What `converge-server` was asked to do.
#[derive(Debug)]
pub enum Mode {
    /// Run the relay: no subcommand, or `serve`.
    Serve(Box<Config>),
    /// `bench-storage`: measure durable writes on this disk.
    #[cfg(feature = "bench")]
    BenchStorage(storage_bench::Settings),
    /// `bench-populate`: write numbered documents into a data directory.
    #[cfg(feature = "bench")]
    BenchPopulate(storage_bench::Populate),
    /// `token`: mint an HS256 token.
    Token(TokenArgs),
}

/// `converge-server token`: mint a token with the relay's HS256 secret.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// File holding the HS256 secret (as for `--jwt-secret-file`).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// The user (`sub`).
    #[arg(long)]
    pub sub: String,
    /// A document id (or `*`) the token may write; repeat for more.
    #[arg(long)]
    pub write: Vec<String>,
    /// A document id (or `*`) the token may read; repeat for more.
    #[arg(long)]
    pub read: Vec<String>,
    /// May bring new documents to the relay.
    #[arg(long)]
    pub create: bool,
    /// May do everything, the admin API included.
    #[arg(long)]
    pub admin: bool,
    /// How long it is valid: seconds, or a number with s, m, h or d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: u64,
    /// `aud`, if the relay requires one.
    #[arg(long)]
    pub aud: Option<String>,
    /// `iss`, if the relay requires one.
    #[arg(long)]
    pub iss: Option<String>,
    /// A token id (`jti`), to revoke this one token later.
    #[arg(long)]
    pub jti: Option<String>,
}

/// `90`, `90s`, `15m`, `1h`, `7d` as seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90s, 15m, 1h or 7d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit is s, m, h or d")),
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!("`{text}` is not a positive duration")),
        Some(secs) => Ok(secs),
    }
}

/// The command line: the relay's flags, or a subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "converge-server",
    version,
    about = "Converge relay: automerge-repo compatible sync server",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay (the same as no subcommand).
    Serve(Box<Config>),
    /// Measure how many durable changes per second this disk takes,
    /// through Converge and through RocksDB alone.
    #[cfg(feature = "bench")]
    BenchStorage(storage_bench::Settings),
    /// Write numbered documents straight into a relay's data directory.
    #[cfg(feature = "bench")]
    BenchPopulate(storage_bench::Populate),
    /// Mint a token signed with the relay's HS256 secret.
    Token(TokenArgs),
}

impl Mode {
    /// Reads the command line `args` (the first being the program name);
    /// for the relay, also the environment and the config file.
    pub fn load<I, T>(args: I) -> Result<Mode, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command()
            .try_get_matches_from(args)
            .map_err(ConfigError::Args)?;
        let cli = Cli::from_arg_matches(&matches).map_err(ConfigError::Args)?;
        Ok(match cli.command {
            None => Mode::Serve(Box::new(cli.serve.finish(&matches)?)),
            Some(Command::Serve(config)) => {
                let matches = matches.subcommand_matches("serve").unwrap_or(&matches);
                Mode::Serve(Box::new(config.finish(matches)?))
            }
            #[cfg(feature = "bench")]
            Some(Command::BenchStorage(settings)) => Mode::BenchStorage(settings),
            #[cfg(feature = "bench")]
            Some(Command::BenchPopulate(populate)) => Mode::BenchPopulate(populate),
            Some(Command::Token(args)) => Mode::Token(args),
        })
    }
}

/// The relay's settings.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "CONVERGE_LISTEN", default_value = "127.0.0.1:3030")]
    pub listen: SocketAddr,
    /// Directory of the RocksDB database (created if missing).
    #[arg(long, env = "CONVERGE_DATA_DIR", default_value = "./converge-data")]
    pub data_dir: PathBuf,
    /// TOML file with any of these settings (snake_case keys).
    #[arg(long, env = "CONVERGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Largest WebSocket message accepted, in bytes; a larger one closes
    /// that connection with code 1009.
    #[arg(long, env = "CONVERGE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Most bytes that may wait to be written to one connection for more
    /// than 10 s; a peer that reads too slowly to keep under this is
    /// disconnected (code 1008).
    #[arg(long, env = "CONVERGE_MAX_OUTBOUND_BYTES", default_value_t = converge_core::runtime::DEFAULT_MAX_OUTBOUND_BYTES)]
    pub max_outbound_bytes: usize,
    /// Seconds between pings; a peer silent for two intervals is dropped.
    #[arg(long, env = "CONVERGE_PING_INTERVAL_SECS", default_value_t = 5)]
    pub ping_interval_secs: u64,
    /// Most documents kept in memory while cold (not being synced); the
    /// least recently used cold ones are dropped and re-read when needed.
    #[arg(long, env = "CONVERGE_MAX_DOCS_IN_MEMORY", default_value_t = 10_000)]
    pub max_docs_in_memory: usize,
    /// fsync every write (slower; survives power loss, not just crashes).
    #[arg(long, env = "CONVERGE_SYNC_WRITES", default_value_t = false)]
    pub sync_writes: bool,
    /// How documents are held in memory: `change-log` (the change graph
    /// and raw changes; documents are materialized only when their contents
    /// are read, e.g. through the HTTP API) or `full-document` (a full
    /// Automerge document each, as automerge-repo does).
    #[arg(long, env = "CONVERGE_REPLICA", default_value = "change-log")]
    pub replica: ReplicaKind,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "CONVERGE_LOG", default_value = "info")]
    pub log: String,
    /// File holding the HS256 secret that signs tokens (at least 32
    /// bytes). With no key configured the relay is open to everyone.
    #[arg(long, env = "CONVERGE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Ed25519 or P-256 public key (PEM) that signs tokens, as `KID=PATH`
    /// or `PATH` (kid = file name without extension). Repeat for several
    /// (key rotation); the environment takes a comma-separated list.
    #[arg(long, env = "CONVERGE_JWT_PUBLIC_KEY_FILE", value_delimiter = ',')]
    pub jwt_public_key_file: Vec<String>,
    /// Required `aud` claim.
    #[arg(long, env = "CONVERGE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim.
    #[arg(long, env = "CONVERGE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Seconds a new connection has to finish the handshake (`join`); then it is closed with 4408.
    #[arg(long, env = "CONVERGE_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// Open WebSocket connections in total; one more gets HTTP 503.
    #[arg(long, env = "CONVERGE_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Open WebSocket connections from one address; one more gets HTTP 429.
    #[arg(long, env = "CONVERGE_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,
    /// New WebSocket connections one address may open per second (as many in a burst); faster gets HTTP 429.
    #[arg(
        long,
        env = "CONVERGE_NEW_CONNECTIONS_PER_IP_PER_SEC",
        default_value_t = 32.0
    )]
    pub new_connections_per_ip_per_sec: f64,
    /// Messages per second one connection may send (ten seconds' worth in a burst); faster closes it with 1008.
    #[arg(long, env = "CONVERGE_MESSAGES_PER_SEC", default_value_t = 2000.0)]
    pub messages_per_sec: f64,
    /// Bytes per second one connection may send (two seconds' worth, and at least one largest message, in a burst); faster closes it with 1008.
    #[arg(long, env = "CONVERGE_BYTES_PER_SEC", default_value_t = 33554432.0)]
    pub bytes_per_sec: f64,
    /// HTTP API requests one address may make per second (two seconds' worth in a burst); faster gets HTTP 429 with Retry-After.
    #[arg(
        long,
        env = "CONVERGE_HTTP_REQUESTS_PER_IP_PER_SEC",
        default_value_t = 100.0
    )]
    pub http_requests_per_ip_per_sec: f64,
    /// Distinct documents one connection may sync or ask for; one more closes it with 1008.
    #[arg(
        long,
        env = "CONVERGE_MAX_DOCS_PER_CONNECTION",
        default_value_t = 10_000
    )]
    pub max_docs_per_connection: usize,
    /// Largest change one sync message may carry; a larger one closes the connection with 1002.
    #[arg(long, env = "CONVERGE_MAX_CHANGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_change_bytes: usize,
    /// Largest a document may grow to in storage; changes past it are not applied and close the connection with 1009.
    #[arg(long, env = "CONVERGE_MAX_DOC_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_doc_bytes: usize,
    /// Certificate chain (PEM) to serve TLS with (`wss://`, `https://`);
    /// needs `--tls-key`.
    #[arg(long, env = "CONVERGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for `--tls-cert`.
    #[arg(long, env = "CONVERGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A browser origin (e.g. `https://app.example.com`) allowed to open a
    /// WebSocket; repeat for more (comma-separated in the environment).
    /// Unset: any origin. Clients that send no `Origin` are not affected.
    #[arg(long, env = "CONVERGE_ALLOWED_ORIGIN", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,
    /// A proxy whose `X-Forwarded-For` is believed for the per-address
    /// limits (repeat, or comma-separated in the environment); nobody
    /// else's is.
    #[arg(long, env = "CONVERGE_TRUSTED_PROXY", value_delimiter = ',')]
    pub trusted_proxy: Vec<std::net::IpAddr>,
    /// Cluster mode: a NATS server URL (e.g. `nats://10.0.0.5:4222`) of a
    /// JetStream cluster the relays share; repeat, or comma-separated in
    /// the environment. Unset: a single node with RocksDB as its store.
    #[arg(long, env = "CONVERGE_NATS_URL", value_delimiter = ',')]
    pub nats_url: Vec<String>,
    /// Cluster mode: replicas of each JetStream stream (1 for a single NATS server).
    #[arg(long, env = "CONVERGE_CLUSTER_REPLICAS", default_value_t = 3)]
    pub cluster_replicas: usize,
    /// Cluster mode: streams the documents are spread over (by id hash).
    #[arg(long, env = "CONVERGE_CLUSTER_SHARDS", default_value_t = 4)]
    pub cluster_shards: u32,
    /// What a request without a token may do when keys are configured:
    /// `none` (the default then), `read` or `write`.
    #[arg(long, env = "CONVERGE_ALLOW_ANONYMOUS")]
    pub allow_anonymous: Option<crate::auth::Anonymous>,
}

impl Config {
    /// The connection limits.
    pub fn limits(&self) -> crate::limits::Limits {
        crate::limits::Limits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            new_connections_per_ip_per_sec: self.new_connections_per_ip_per_sec,
            messages_per_sec: self.messages_per_sec,
            bytes_per_sec: self.bytes_per_sec,
            http_requests_per_ip_per_sec: self.http_requests_per_ip_per_sec,
            trusted_proxies: self.trusted_proxy.clone(),
        }
    }

    /// The cluster to join, if any.
    pub fn cluster(&self) -> Option<crate::cluster::ClusterSettings> {
        (!self.nats_url.is_empty()).then(|| crate::cluster::ClusterSettings {
            urls: self.nats_url.clone(),
            replicas: self.cluster_replicas,
            shards: self.cluster_shards,
        })
    }

    /// The token settings.
    pub fn auth(&self) -> crate::auth::AuthSettings {
        crate::auth::AuthSettings {
            secret_file: self.jwt_secret_file.clone(),
            public_keys: self.jwt_public_key_file.clone(),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            anonymous: self.allow_anonymous,
        }
    }
}

/// The file form: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    max_message_bytes: Option<usize>,
    max_outbound_bytes: Option<usize>,
    ping_interval_secs: Option<u64>,
    max_docs_in_memory: Option<usize>,
    sync_writes: Option<bool>,
    replica: Option<String>,
    log: Option<String>,
    jwt_secret_file: Option<PathBuf>,
    jwt_public_key_file: Option<Vec<String>>,
    jwt_audience: Option<String>,
    jwt_issuer: Option<String>,
    allow_anonymous: Option<crate::auth::Anonymous>,
    handshake_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    new_connections_per_ip_per_sec: Option<f64>,
    messages_per_sec: Option<f64>,
    bytes_per_sec: Option<f64>,
    http_requests_per_ip_per_sec: Option<f64>,
    max_docs_per_connection: Option<usize>,
    max_change_bytes: Option<usize>,
    max_doc_bytes: Option<usize>,
    trusted_proxy: Option<Vec<std::net::IpAddr>>,
    nats_url: Option<Vec<String>>,
    cluster_replicas: Option<usize>,
    cluster_shards: Option<u32>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    allowed_origin: Option<Vec<String>>,
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Flags or environment did not parse.
    #[error("{0}")]
    Args(#[from] clap::Error),
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a bad value.
    #[error("bad config file {}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A value is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Config {
    /// Applies the config file (under what flags and environment set) and
    /// checks the result; `matches` are those the settings were read from.
    fn finish(mut self, matches: &ArgMatches) -> Result<Config, ConfigError> {
        if let Some(path) = self.config.clone() {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            self.apply_file(matches, file)?;
        }
        self.validate()?;
        Ok(self)
    }

    fn apply_file(&mut self, matches: &ArgMatches, file: FileConfig) -> Result<(), ConfigError> {
        // A key of the file counts unless a flag or the environment set it.
        let given = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        // Every key is the field of the same name (`Option` fields take
        // the bare value).
        macro_rules! take {
            ($($key:ident),* $(,)?) => {$(
                if let (false, Some(v)) = (given(stringify!($key)), file.$key) {
                    self.$key = v.into();
                }
            )*};
        }
        take!(
            listen,
            data_dir,
            max_message_bytes,
            max_outbound_bytes,
            ping_interval_secs,
            max_docs_in_memory,
            sync_writes,
            log,
            jwt_secret_file,
            jwt_public_key_file,
            jwt_audience,
            jwt_issuer,
            allow_anonymous,
            handshake_timeout_secs,
            max_connections,
            max_connections_per_ip,
            new_connections_per_ip_per_sec,
            messages_per_sec,
            bytes_per_sec,
            http_requests_per_ip_per_sec,
            max_docs_per_connection,
            max_change_bytes,
            max_doc_bytes,
            trusted_proxy,
            nats_url,
            cluster_replicas,
            cluster_shards,
            tls_cert,
            tls_key,
            allowed_origin,
        );
        if let (false, Some(v)) = (given("replica"), file.replica) {
            self.replica = v.parse().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(format!(
                "max_message_bytes must be at least 1024, got {}",
                self.max_message_bytes
            )));
        }
        if self.max_outbound_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid(format!(
                "max_outbound_bytes must be at least 65536, got {}",
                self.max_outbound_bytes
            )));
        }
        for (name, value) in [
            ("handshake_timeout_secs", self.handshake_timeout_secs as f64),
            ("max_connections", self.max_connections as f64),
            ("max_connections_per_ip", self.max_connections_per_ip as f64),
            (
                "new_connections_per_ip_per_sec",
                self.new_connections_per_ip_per_sec,
            ),
            ("messages_per_sec", self.messages_per_sec),
            ("bytes_per_sec", self.bytes_per_sec),
            (
                "http_requests_per_ip_per_sec",
                self.http_requests_per_ip_per_sec,
            ),
            (
                "max_docs_per_connection",
                self.max_docs_per_connection as f64,
            ),
            ("max_change_bytes", self.max_change_bytes as f64),
            ("max_doc_bytes", self.max_doc_bytes as f64),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be a positive number, got {value}"
                )));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls_cert and tls_key go together".into(),
            ));
        }
        if self.ping_interval_secs == 0 {
            return Err(ConfigError::Invalid(
                "ping_interval_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(args: &[&str]) -> Result<Mode, ConfigError> {
        Mode::load(std::iter::once("converge-server").chain(args.iter().copied()))
    }

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        match mode(args)? {
            Mode::Serve(config) => Ok(*config),
            other => panic!("{args:?} is not the relay: {other:?}"),
        }
    }

    /// `token` mints with the relay's secret; its `--ttl` takes units.
    #[test]
    fn the_token_subcommand_takes_its_flags() {
        let Ok(Mode::Token(t)) = mode(&[
            "token",
            "--secret-file",
            "/s",
            "--sub",
            "alice",
            "--write",
            "*",
            "--ttl",
            "15m",
        ]) else {
            panic!("token");
        };
        assert_eq!((t.sub.as_str(), t.ttl, t.write.len()), ("alice", 900, 1));
        assert!(matches!(
            mode(&["token", "--secret-file", "/s", "--sub", "a", "--ttl", "0h"]),
            Err(ConfigError::Args(_))
        ));
        assert!(matches!(
            mode(&["token", "--secret-file", "/s", "--sub", "a", "--ttl", "5y"]),
            Err(ConfigError::Args(_))
        ));
    }

    /// No subcommand and `serve` both run the relay, with the same flags.
    #[test]
    fn subcommands_choose_the_mode() {
        let plain = load(&["--listen", "127.0.0.1:4001"]).expect("flags alone");
        assert_eq!(plain.listen.to_string(), "127.0.0.1:4001");
        let serve = load(&["serve", "--listen", "127.0.0.1:4002"]).expect("serve");
        assert_eq!(serve.listen.to_string(), "127.0.0.1:4002");
        assert!(matches!(
            load(&["serve", "--ping-interval-secs", "0"]),
            Err(ConfigError::Invalid(_))
        ));
        // Flags go after the subcommand they belong to.
        assert!(matches!(
            mode(&["--listen", "127.0.0.1:1", "serve"]),
            Err(ConfigError::Args(_))
        ));
    }

    /// With the feature `bench`, the benchmark tools are subcommands with
    /// flags of their own.
    #[cfg(feature = "bench")]
    #[test]
    fn benchmark_subcommands_take_their_flags() {
        let Ok(Mode::BenchStorage(s)) = mode(&[
            "bench-storage",
            "--dir",
            "/tmp/b",
            "--writers",
            "8",
            "--no-sync",
        ]) else {
            panic!("bench-storage");
        };
        assert_eq!(
            (s.dir, s.writers, s.sync),
            (PathBuf::from("/tmp/b"), 8, false)
        );
        let Ok(Mode::BenchStorage(s)) = mode(&["bench-storage"]) else {
            panic!("bench-storage with defaults");
        };
        assert_eq!((s.writers, s.secs, s.sync), (1, 3.0, true));
        assert!(matches!(
            mode(&["bench-storage", "--writers", "0"]),
            Err(ConfigError::Args(_))
        ));

        let Ok(Mode::BenchPopulate(p)) = mode(&[
            "bench-populate",
            "--dir",
            "/tmp/d",
            "--docs",
            "10",
            "--set",
            "7",
        ]) else {
            panic!("bench-populate");
        };
        assert_eq!(
            (p.dir, p.docs, p.set, p.doc_file),
            (PathBuf::from("/tmp/d"), 10, 7, None)
        );
        assert!(
            matches!(
                mode(&["bench-populate", "--docs", "1"]),
                Err(ConfigError::Args(_))
            ),
            "--dir is required"
        );
        assert!(matches!(
            mode(&["--listen", "127.0.0.1:1", "bench-storage"]),
            Err(ConfigError::Args(_))
        ));
    }

    #[test]
    fn defaults_file_and_flags_apply_in_order() {
        let c = load(&[]).expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:3030");
        assert_eq!(c.data_dir, PathBuf::from("./converge-data"));

        let dir = std::env::temp_dir().join(format!("converge-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:4000\"\ndata_dir = \"/var/lib/converge\"\nping_interval_secs = 9\n",
        )
        .expect("write");
        let path = file.to_str().expect("utf8");
        let c = load(&["--config", path]).expect("file");
        assert_eq!(c.listen.to_string(), "0.0.0.0:4000");
        assert_eq!(c.ping_interval_secs, 9);
        // A flag beats the file.
        let c = load(&["--config", path, "--listen", "127.0.0.1:5000"]).expect("flag wins");
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/converge"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        assert!(matches!(
            load(&["--listen", "nowhere"]),
            Err(ConfigError::Args(_))
        ));
        assert!(matches!(
            load(&["--ping-interval-secs", "0"]),
            Err(ConfigError::Invalid(_))
        ));
        let err = load(&["--max-outbound-bytes", "100"]).expect_err("too small a queue");
        assert!(err.to_string().contains("max_outbound_bytes"), "{err}");
        let err = load(&["--config", "/nonexistent/converge.toml"]).expect_err("missing file");
        assert!(err.to_string().contains("cannot read config file"));
        let err = load(&["--replica", "half-document"]).expect_err("unknown replica");
        assert!(err.to_string().contains("change-log"), "{err}");
    }

    #[test]
    fn replica_kind_comes_from_flag_or_file() {
        assert_eq!(load(&[]).expect("defaults").replica, ReplicaKind::ChangeLog);
        let c = load(&["--replica", "full-document"]).expect("flag");
        assert_eq!(c.replica, ReplicaKind::FullDocument);
        let dir = std::env::temp_dir().join(format!("converge-replica-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("relay.toml");
        std::fs::write(&file, "replica = \"full-document\"\n").expect("write");
        let c = load(&["--config", file.to_str().expect("utf8")]).expect("file");
        assert_eq!(c.replica, ReplicaKind::FullDocument);
        std::fs::write(&file, "replica = \"nope\"\n").expect("write");
        let err = load(&["--config", file.to_str().expect("utf8")]).expect_err("bad file value");
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
