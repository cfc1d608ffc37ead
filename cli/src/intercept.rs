//! `interpose intercept`: turn holding on (with its filters) or off, show the status, and
//! manage the replace rules proxies apply themselves.

use anyhow::{Context, bail};
use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};
use platform::client::AuthChannel;
use proto::{
    common::Direction,
    intercept::{
        AddRuleRequest, GetConfigRequest, GetStatusRequest, InterceptConfig, RemoveRuleRequest,
        ReplaceRule, SetConfigRequest, intercept_client::InterceptClient,
    },
    names::name_of,
};
use serde_json::{Value, json};

use crate::{
    ServerArgs,
    client::{channel, status},
    hexdump::parse_hex,
    output::preview,
};

/// Largest message a client accepts or sends (a replacement at the service's 4 MiB limit).
const MAX_MESSAGE: usize = 8 << 20;

/// An intercept client.
pub async fn client(server: &ServerArgs) -> anyhow::Result<InterceptClient<AuthChannel>> {
    Ok(InterceptClient::new(channel(server).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Which direction to hold or rewrite.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DirArg {
    C2s,
    S2c,
    Both,
}

impl DirArg {
    fn to_proto(self) -> i32 {
        match self {
            DirArg::C2s => Direction::C2s as i32,
            DirArg::S2c => Direction::S2c as i32,
            DirArg::Both => Direction::Unspecified as i32,
        }
    }
}

fn dir_name(raw: i32) -> &'static str {
    name_of::<Direction>(raw).unwrap_or("both")
}

#[derive(Debug, Subcommand)]
pub enum InterceptCommand {
    /// Hold the packets these filters select (each filter given must match; the filters
    /// replace any earlier ones).
    On(OnArgs),
    /// Stop holding; every held packet is forwarded unmodified, oldest first.
    Off,
    /// The configuration, the queue and its counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Replace rules: rewrite matching bytes in the proxy itself, without holding.
    #[command(subcommand)]
    Rule(RuleCommand),
}

#[derive(Debug, Args)]
pub struct OnArgs {
    /// Which direction to hold.
    #[arg(long, value_enum, default_value = "both")]
    pub direction: DirArg,
    /// Only connections to this host (exact, or `*.suffix`); repeat for several.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Only connections to this target port; repeat for several.
    #[arg(long = "port", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
    /// Only connections through this proxy node; repeat for several.
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// Only this connection ID (one the registry knows); repeat for several.
    #[arg(long = "conn", value_parser = crate::history::conn_id)]
    pub conns: Vec<u64>,
    /// Only packets containing this text.
    #[arg(long, conflicts_with = "contains_hex")]
    pub contains: Option<String>,
    /// Only packets containing these bytes, in hex.
    #[arg(long)]
    pub contains_hex: Option<String>,
    /// Forward a held packet unmodified after this many seconds without a verdict (0: wait
    /// for ever).
    #[arg(long, default_value_t = 0)]
    pub timeout: u32,
}

#[derive(Debug, Subcommand)]
pub enum RuleCommand {
    /// Add a rule: every occurrence of the match becomes the replacement.
    Add(RuleAddArgs),
    /// List the rules.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a rule by ID.
    Remove { id: u64 },
}

#[derive(Debug, Args)]
pub struct RuleAddArgs {
    /// Which direction to rewrite.
    #[arg(long, value_enum, default_value = "both")]
    pub direction: DirArg,
    /// The text to find.
    #[arg(long = "match", conflicts_with = "match_hex")]
    pub match_text: Option<String>,
    /// The bytes to find, in hex.
    #[arg(long)]
    pub match_hex: Option<String>,
    /// The text to put in its place (may be empty).
    #[arg(long = "replace", conflicts_with = "replace_hex")]
    pub replace_text: Option<String>,
    /// The bytes to put in its place, in hex.
    #[arg(long)]
    pub replace_hex: Option<String>,
    /// Only connections to this host (exact, or `*.suffix`); repeat for several.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Only connections to this target port; repeat for several.
    #[arg(long = "port", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
}

/// Bytes from a text or a hex option (at most one is given).
pub fn text_or_hex(
    text: Option<&str>,
    hex: Option<&str>,
    what: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    match (text, hex) {
        (Some(t), _) => Ok(Some(t.as_bytes().to_vec())),
        (None, Some(h)) => parse_hex(h)
            .map(Some)
            .with_context(|| format!("--{what}-hex")),
        (None, None) => Ok(None),
    }
}

/// Runs one `interpose intercept` command.
pub async fn run(server: &ServerArgs, cmd: InterceptCommand) -> anyhow::Result<()> {
    let mut c = client(server).await?;
    match cmd {
        InterceptCommand::On(a) => {
            check_known(server, &a.conns).await?;
            let contains =
                text_or_hex(a.contains.as_deref(), a.contains_hex.as_deref(), "contains")?;
            let config = InterceptConfig {
                enabled: true,
                direction: a.direction.to_proto(),
                hosts: a.hosts,
                ports: a.ports.into_iter().map(u32::from).collect(),
                contains: contains.unwrap_or_default(),
                hold_timeout_secs: a.timeout,
                nodes: a.nodes,
                conn_ids: a.conns,
                rules: Vec::new(),
            };
            let now = set(&mut c, config).await?;
            crate::say!("intercept on: {}", describe(&now));
        }
        InterceptCommand::Off => {
            let mut config = c
                .get_config(GetConfigRequest {})
                .await
                .map_err(status)?
                .into_inner();
            config.enabled = false;
            set(&mut c, config).await?;
            crate::say!("intercept off: every held packet was forwarded unmodified");
        }
        InterceptCommand::Status { json } => show_status(&mut c, json).await?,
        InterceptCommand::Rule(r) => rule(&mut c, r).await?,
    }
    Ok(())
}

/// Refuses connection IDs the registry has no record of (a typo would hold nothing, silently).
/// A server without the registry service (a standalone intercept-svc) cannot check them.
async fn check_known(server: &ServerArgs, ids: &[u64]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut registry = crate::client::registry(server).await?;
    for &id in ids {
        match registry
            .get_connection(proto::registry::GetConnectionRequest { id })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => bail!(
                "--conn {id}: no connection with ID {id} (`interpose conns list` shows the IDs)"
            ),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(()),
            Err(s) => return Err(status(s)),
        }
    }
    Ok(())
}

async fn set(
    c: &mut InterceptClient<AuthChannel>,
    config: InterceptConfig,
) -> anyhow::Result<InterceptConfig> {
    Ok(c.set_config(SetConfigRequest {
        config: Some(config),
    })
    .await
    .map_err(status)?
    .into_inner())
}

/// The hold filters in words.
fn describe(c: &InterceptConfig) -> String {
    let mut parts = vec![format!("direction {}", dir_name(c.direction))];
    let list = |v: Vec<String>| v.join(", ");
    if !c.hosts.is_empty() {
        parts.push(format!("hosts {}", list(c.hosts.clone())));
    }
    if !c.ports.is_empty() {
        parts.push(format!(
            "ports {}",
            list(c.ports.iter().map(u32::to_string).collect())
        ));
    }
    if !c.nodes.is_empty() {
        parts.push(format!("nodes {}", list(c.nodes.clone())));
    }
    if !c.conn_ids.is_empty() {
        parts.push(format!(
            "connections {}",
            list(c.conn_ids.iter().map(u64::to_string).collect())
        ));
    }
    if !c.contains.is_empty() {
        parts.push(format!("containing \"{}\"", preview(&c.contains, 60)));
    }
    if c.hold_timeout_secs > 0 {
        parts.push(format!("auto-forward after {} s", c.hold_timeout_secs));
    }
    parts.join("; ")
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A replace rule as JSON.
pub fn rule_json(r: &ReplaceRule) -> Value {
    json!({
        "id": r.id,
        "direction": dir_name(r.direction),
        "match_b64": b64(&r.pattern),
        "replace_b64": b64(&r.replacement),
        "hosts": r.hosts,
        "ports": r.ports,
    })
}

async fn show_status(c: &mut InterceptClient<AuthChannel>, json: bool) -> anyhow::Result<()> {
    let s = c
        .get_status(GetStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let config = s.config.clone().unwrap_or_default();
    if json {
        let v = json!({
            "enabled": config.enabled,
            "direction": dir_name(config.direction),
            "hosts": config.hosts,
            "ports": config.ports,
            "nodes": config.nodes,
            "conn_ids": config.conn_ids,
            "contains_b64": b64(&config.contains),
            "hold_timeout_secs": config.hold_timeout_secs,
            "held": s.held,
            "max_held": s.max_held,
            "overflow_forwarded": s.overflow_forwarded,
            "timed_out": s.timed_out,
            "released_by_off": s.released_by_off,
            "registry_connected": s.registry_connected,
            "held_bytes": s.held_bytes,
            "max_held_bytes": s.max_held_bytes,
            "too_large_forwarded": s.too_large_forwarded,
            "abandoned": s.abandoned,
            "abandoned_expired": s.abandoned_expired,
            "rules": config.rules.iter().map(rule_json).collect::<Vec<_>>(),
        });
        crate::say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if config.enabled {
        crate::say!("intercept: on ({})", describe(&config));
    } else {
        crate::say!("intercept: off");
    }
    crate::say!(
        "held: {} (at most {}), {} bytes (at most {})",
        s.held,
        s.max_held,
        s.held_bytes,
        s.max_held_bytes
    );
    crate::say!(
        "forwarded without holding: {} (queue full), {} (packet above 4 MiB); timed out: {}; \
         released by off: {}",
        s.overflow_forwarded,
        s.too_large_forwarded,
        s.timed_out,
        s.released_by_off
    );
    crate::say!(
        "abandoned (their proxy stopped waiting): {} listed, {} expired",
        s.abandoned,
        s.abandoned_expired
    );
    crate::say!(
        "registry: {}",
        if s.registry_connected {
            "following connection status"
        } else {
            "unreachable (held packets show their last known status)"
        }
    );
    crate::say!("replace rules: {}", config.rules.len());
    Ok(())
}

async fn rule(c: &mut InterceptClient<AuthChannel>, cmd: RuleCommand) -> anyhow::Result<()> {
    match cmd {
        RuleCommand::Add(a) => {
            let Some(pattern) =
                text_or_hex(a.match_text.as_deref(), a.match_hex.as_deref(), "match")?
            else {
                bail!("give the bytes to find: --match TEXT or --match-hex HEX");
            };
            let Some(replacement) = text_or_hex(
                a.replace_text.as_deref(),
                a.replace_hex.as_deref(),
                "replace",
            )?
            else {
                bail!("give the replacement: --replace TEXT or --replace-hex HEX (may be empty)");
            };
            let r = c
                .add_rule(AddRuleRequest {
                    rule: Some(ReplaceRule {
                        id: 0,
                        direction: a.direction.to_proto(),
                        pattern,
                        replacement,
                        hosts: a.hosts,
                        ports: a.ports.into_iter().map(u32::from).collect(),
                    }),
                })
                .await
                .map_err(status)?
                .into_inner();
            crate::say!("added rule {}", r.id);
        }
        RuleCommand::List { json } => {
            let rules = c
                .get_config(GetConfigRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .rules;
            if json {
                let v: Vec<Value> = rules.iter().map(rule_json).collect();
                crate::say!("{}", serde_json::to_string_pretty(&v)?);
            } else if rules.is_empty() {
                crate::say!("no replace rules");
            } else {
                for r in &rules {
                    crate::say!(
                        "{:>4}  {:<4}  \"{}\" -> \"{}\"{}{}",
                        r.id,
                        dir_name(r.direction),
                        preview(&r.pattern, 40),
                        preview(&r.replacement, 40),
                        if r.hosts.is_empty() {
                            String::new()
                        } else {
                            format!("  hosts {}", r.hosts.join(", "))
                        },
                        if r.ports.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "  ports {}",
                                r.ports
                                    .iter()
                                    .map(u32::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        },
                    );
                }
            }
        }
        RuleCommand::Remove { id } => {
            c.remove_rule(RemoveRuleRequest { id })
                .await
                .map_err(status)?;
            crate::say!("removed rule {id}");
        }
    }
    Ok(())
}
