//! Account commands: `login`, `whoami`, `org`, `token`, `secret`, `user`, `audit`. They talk to
//! a running server over HTTP with the stored credential (see [`crate::client`]); tables by
//! default, `--json` for scripts (the API's JSON, unchanged).

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Client, Credentials};

/// `--json` and `--org`, shared by the commands that act for an owner.
#[derive(Args, Clone)]
pub struct Common {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Act for this organization (id), sent as `X-KiloCode-OrganizationId`.
    #[arg(long, value_name = "ORG_ID")]
    pub org: Option<String>,
}

/// `kilocloud login`: store credentials, or (`approve`/`deny CODE`) decide a device's login.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct LoginArgs {
    #[command(subcommand)]
    device: Option<DeviceCommand>,
    /// Server URL, e.g. http://127.0.0.1:8787
    #[arg(long, required = true)]
    url: Option<String>,
    /// A JWT or API key (`kc_…`); `-` reads it from stdin (keeps it out of the process list).
    #[arg(long, required = true)]
    token: Option<String>,
}

/// A device's login (`kilo auth login` shows a code and waits), decided with the stored
/// credential, which must be your own.
#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Let the device sign in as you: it gets a token of yours, valid 365 days.
    Approve {
        /// The code the device shows (`XXXX-XXXX`; case and dash do not matter).
        code: String,
    },
    /// Refuse the device's login.
    Deny {
        /// The code the device shows.
        code: String,
    },
}

/// `kilocloud org …`
#[derive(Subcommand)]
pub enum OrgCommand {
    /// Create an organization; you become its owner.
    Create {
        /// Name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Organizations you belong to.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Members of an organization.
    Members {
        /// Organization id.
        org_id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Add a member or change their role.
    AddMember {
        /// Organization id.
        org_id: String,
        /// User id or email.
        user: String,
        /// member, admin or owner.
        #[arg(long, default_value = "member")]
        role: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a member.
    RemoveMember {
        /// Organization id.
        org_id: String,
        /// User id or email.
        user: String,
        #[command(flatten)]
        common: Common,
    },
    /// Show the organization's gateway policy (model allow-list, member daily limits, custom
    /// models) as JSON, or replace it with `--set FILE` (admins; `-` reads stdin).
    Policy {
        /// Organization id.
        org_id: String,
        /// A JSON file holding the whole new policy (see docs/gateway.md).
        #[arg(long, value_name = "FILE")]
        set: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud token …`
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create an API key (printed once).
    Create {
        /// Name.
        name: String,
        /// Expire after this many days. Default: never.
        #[arg(long)]
        expires_in_days: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
    /// List API keys (never the keys themselves).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke an API key.
    Revoke {
        /// Key id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud secret …`
#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store a secret; the value is read from stdin unless --value is given.
    Set {
        /// Name.
        name: String,
        /// The value (visible in the process list; prefer stdin).
        #[arg(long)]
        value: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Names and times of secrets.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Delete a secret.
    Delete {
        /// Name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud user …`
#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user and a first API key for them (site administrators).
    Create {
        /// Email.
        #[arg(long)]
        email: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Make them a site administrator.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud credits …`
#[derive(Subcommand)]
pub enum CreditsCommand {
    /// Add credit to an owner (site administrators); negative takes it back.
    Grant {
        /// `user:<uuid>` or `org:<uuid>` (ids from `whoami --json`, `org list`).
        owner: String,
        /// Amount in USD, e.g. 10 or 0.5.
        #[arg(long, allow_hyphen_values = true)]
        usd: f64,
        /// Why; kept with the grant.
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        common: Common,
    },
    /// The balance of the owner acted for.
    Balance {
        #[command(flatten)]
        common: Common,
    },
}

/// `kilocloud usage`: gateway requests of the owner acted for, newest first; every filter
/// given must match.
#[derive(Args)]
pub struct UsageArgs {
    /// Most rows (1-1000).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Only this model (as requested or as served).
    #[arg(long)]
    model: Option<String>,
    /// Only this provider.
    #[arg(long)]
    provider: Option<String>,
    /// Only this HTTP status.
    #[arg(long)]
    status: Option<u16>,
    /// Only this feature (`X-KiloCode-Feature`, e.g. cloud-agent).
    #[arg(long)]
    feature: Option<String>,
    /// Only this project (`X-KiloCode-ProjectId`).
    #[arg(long)]
    project: Option<String>,
    /// Only this task (`X-KiloCode-TaskId`).
    #[arg(long)]
    task: Option<String>,
    /// Only this user's requests (user id).
    #[arg(long)]
    user: Option<String>,
    /// From this UTC time on: `2026-11-28` or `2026-11-28T09:30:00Z`.
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Before this UTC time, as `--since`.
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    #[command(flatten)]
    common: Common,
}

/// `kilocloud audit`: your audit log, or an organization's with `--org`.
#[derive(Args)]
pub struct AuditArgs {
    /// Most entries (1-1000).
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[command(flatten)]
    common: Common,
}

pub(crate) fn client(common: &Common) -> anyhow::Result<Client> {
    Client::new(Credentials::load()?, common.org.clone())
}

/// Prints `rows` under `headers` with columns padded to their widest cell.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn time(v: &Value) -> String {
    v.as_i64()
        .and_then(chrono_like)
        .unwrap_or_else(|| "-".into())
}

/// ms since epoch → `YYYY-MM-DD HH:MM:SS` UTC.
fn chrono_like(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

pub(crate) fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `kilocloud login`: checks the credential against the server, then stores it.
pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    if let Some(device) = args.device {
        let (code, what) = match &device {
            DeviceCommand::Approve { code } => (code, "approve"),
            DeviceCommand::Deny { code } => (code, "deny"),
        };
        let client = Client::new(Credentials::load()?, None)?;
        // Codes are letters, digits and a dash; anything else is a typo, not part of it.
        let code: String = code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let path = format!("/api/device-auth/codes/{code}/{what}");
        client.call(Method::POST, &path, None).await?;
        match device {
            DeviceCommand::Approve { .. } => {
                println!("approved: the device is signed in as you at its next poll")
            }
            DeviceCommand::Deny { .. } => println!("denied: the device's login is refused"),
        }
        return Ok(());
    }
    let (Some(url), Some(token)) = (args.url, args.token) else {
        anyhow::bail!("kilocloud login needs --url and --token (or: login approve|deny CODE)");
    };
    let token = match token.as_str() {
        "-" => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
            t.trim().to_owned()
        }
        t => t.to_owned(),
    };
    let creds = Credentials {
        url: url.trim_end_matches('/').to_owned(),
        token,
    };
    let me = Client::new(creds.clone(), None)?
        .call(Method::GET, "/api/users/me", None)
        .await?;
    let path = creds.save()?;
    println!(
        "logged in to {} as {} (credentials in {})",
        creds.url,
        s(&me["user"]["email"]),
        path.display()
    );
    Ok(())
}

/// `kilocloud whoami`.
pub async fn whoami(common: Common) -> anyhow::Result<()> {
    let me = client(&common)?
        .call(Method::GET, "/api/users/me", None)
        .await?;
    if common.json {
        return print_json(&me);
    }
    println!("{} ({})", s(&me["user"]["email"]), s(&me["user"]["id"]));
    println!("credential: {}", s(&me["credential"]));
    if me["user"]["isAdmin"] == true {
        println!("site administrator");
    }
    let orgs = me["organizations"].as_array().cloned().unwrap_or_default();
    if !orgs.is_empty() {
        println!();
        table(
            &["ORGANIZATION", "ID", "ROLE"],
            orgs.iter()
                .map(|o| vec![s(&o["name"]), s(&o["id"]), s(&o["role"])])
                .collect(),
        );
    }
    Ok(())
}

/// `kilocloud org …`.
pub async fn org(command: OrgCommand) -> anyhow::Result<()> {
    match command {
        OrgCommand::Create { name, common } => {
            let org = client(&common)?
                .call(Method::POST, "/api/orgs", Some(json!({"name": name})))
                .await?;
            if common.json {
                return print_json(&org);
            }
            println!(
                "created organization {} ({})",
                s(&org["name"]),
                s(&org["id"])
            );
        }
        OrgCommand::List { common } => {
            let list = client(&common)?
                .call(Method::GET, "/api/orgs", None)
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list["organizations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    vec![
                        s(&o["name"]),
                        s(&o["id"]),
                        s(&o["role"]),
                        time(&o["createdAtMs"]),
                    ]
                })
                .collect();
            table(&["NAME", "ID", "ROLE", "CREATED"], rows);
        }
        OrgCommand::Members { org_id, common } => {
            let list = client(&common)?
                .call(Method::GET, &format!("/api/orgs/{org_id}/members"), None)
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    vec![
                        s(&m["email"]),
                        s(&m["userId"]),
                        s(&m["role"]),
                        time(&m["addedAtMs"]),
                    ]
                })
                .collect();
            table(&["EMAIL", "USER ID", "ROLE", "ADDED"], rows);
        }
        OrgCommand::AddMember {
            org_id,
            user,
            role,
            common,
        } => {
            let m = client(&common)?
                .call(
                    Method::PUT,
                    &format!("/api/orgs/{org_id}/members/{user}"),
                    Some(json!({"role": role})),
                )
                .await?;
            if common.json {
                return print_json(&m);
            }
            println!("{} is now {} of {org_id}", s(&m["email"]), s(&m["role"]));
        }
        OrgCommand::RemoveMember {
            org_id,
            user,
            common,
        } => {
            client(&common)?
                .call(
                    Method::DELETE,
                    &format!("/api/orgs/{org_id}/members/{user}"),
                    None,
                )
                .await?;
            if common.json {
                return print_json(&json!({"removed": user}));
            }
            println!("removed {user} from {org_id}");
        }
        OrgCommand::Policy {
            org_id,
            set,
            common,
        } => {
            let path = format!("/api/orgs/{org_id}/gateway-policy");
            let policy = match set {
                None => client(&common)?.call(Method::GET, &path, None).await?,
                Some(file) => {
                    let text = match file.as_str() {
                        "-" => std::io::read_to_string(std::io::stdin())?,
                        file => std::fs::read_to_string(file)
                            .with_context(|| format!("cannot read {file}"))?,
                    };
                    let body: Value = serde_json::from_str(&text)
                        .with_context(|| format!("{file} is not valid JSON"))?;
                    client(&common)?
                        .call(Method::PUT, &path, Some(body))
                        .await?
                }
            };
            print_json(&policy)?;
        }
    }
    Ok(())
}

/// `kilocloud token …`.
pub async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            name,
            expires_in_days,
            common,
        } => {
            let c = client(&common)?;
            let expires_at_ms = match expires_in_days {
                Some(days) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_millis() as i64;
                    Some(now + i64::from(days) * 86_400_000)
                }
                None => None,
            };
            let created = c
                .call(
                    Method::POST,
                    "/api/tokens",
                    Some(json!({"name": name, "expiresAtMs": expires_at_ms})),
                )
                .await?;
            if common.json {
                return print_json(&created);
            }
            println!("{}", s(&created["key"]));
            eprintln!(
                "created API key {} ({}); it is shown only once",
                s(&created["apiKey"]["id"]),
                s(&created["apiKey"]["name"])
            );
        }
        TokenCommand::List { common } => {
            let list = client(&common)?
                .call(Method::GET, "/api/tokens", None)
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list["apiKeys"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|k| {
                    let state = if !k["revokedAtMs"].is_null() {
                        "revoked"
                    } else {
                        "active"
                    };
                    vec![
                        s(&k["id"]),
                        s(&k["name"]),
                        s(&k["hint"]),
                        state.into(),
                        time(&k["createdAtMs"]),
                        time(&k["lastUsedAtMs"]),
                        time(&k["expiresAtMs"]),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "NAME",
                    "KEY",
                    "STATE",
                    "CREATED",
                    "LAST USED",
                    "EXPIRES",
                ],
                rows,
            );
        }
        TokenCommand::Revoke { id, common } => {
            let k = client(&common)?
                .call(Method::DELETE, &format!("/api/tokens/{id}"), None)
                .await?;
            if common.json {
                return print_json(&k);
            }
            println!("revoked API key {} ({})", s(&k["id"]), s(&k["name"]));
        }
    }
    Ok(())
}

/// `kilocloud secret …`.
pub async fn secret(command: SecretCommand) -> anyhow::Result<()> {
    match command {
        SecretCommand::Set {
            name,
            value,
            common,
        } => {
            let value = match value {
                Some(v) => v,
                None => {
                    let mut v = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut v)?;
                    v.strip_suffix('\n').map(str::to_owned).unwrap_or(v)
                }
            };
            let meta = client(&common)?
                .call(
                    Method::PUT,
                    &format!("/api/secrets/{name}"),
                    Some(json!({"value": value})),
                )
                .await?;
            if common.json {
                return print_json(&meta);
            }
            println!("stored secret {}", s(&meta["name"]));
        }
        SecretCommand::List { common } => {
            let list = client(&common)?
                .call(Method::GET, "/api/secrets", None)
                .await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list["secrets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    vec![
                        s(&m["name"]),
                        time(&m["createdAtMs"]),
                        time(&m["updatedAtMs"]),
                    ]
                })
                .collect();
            table(&["NAME", "CREATED", "UPDATED"], rows);
        }
        SecretCommand::Delete { name, common } => {
            client(&common)?
                .call(Method::DELETE, &format!("/api/secrets/{name}"), None)
                .await?;
            if common.json {
                return print_json(&json!({"deleted": name}));
            }
            println!("deleted secret {name}");
        }
    }
    Ok(())
}

/// `kilocloud user …`.
pub async fn user(command: UserCommand) -> anyhow::Result<()> {
    let UserCommand::Create {
        email,
        name,
        admin,
        common,
    } = command;
    let created = client(&common)?
        .call(
            Method::POST,
            "/api/users",
            Some(json!({"email": email, "name": name, "isAdmin": admin})),
        )
        .await?;
    if common.json {
        return print_json(&created);
    }
    println!("{}", s(&created["apiKey"]));
    eprintln!(
        "created user {} ({}); give them the API key above, shown only once",
        s(&created["user"]["email"]),
        s(&created["user"]["id"])
    );
    Ok(())
}

/// `kilocloud audit`.
pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let path = match &args.common.org {
        Some(org) => format!("/api/orgs/{org}/audit?limit={}", args.limit),
        None => format!("/api/users/me/audit?limit={}", args.limit),
    };
    let page = client(&args.common)?.call(Method::GET, &path, None).await?;
    if args.common.json {
        return print_json(&page);
    }
    let rows = page["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                time(&e["atMs"]),
                s(&e["action"]),
                s(&e["target"]),
                s(&e["actor"]),
                s(&e["requestId"]),
            ]
        })
        .collect();
    table(&["TIME (UTC)", "ACTION", "TARGET", "BY", "REQUEST"], rows);
    Ok(())
}

/// `kilocloud credits …`.
pub async fn credits(command: CreditsCommand) -> anyhow::Result<()> {
    match command {
        CreditsCommand::Grant {
            owner,
            usd,
            note,
            common,
        } => {
            anyhow::ensure!(
                usd.is_finite() && usd != 0.0,
                "--usd must be a non-zero amount"
            );
            let c = client(&common)?;
            let micros = (usd * 1e6).round() as i64;
            let res = c
                .call(
                    Method::POST,
                    "/api/admin/credits",
                    Some(json!({"owner": owner, "amountMicrodollars": micros, "note": note})),
                )
                .await?;
            if common.json {
                return print_json(&res);
            }
            let balance = res["balanceMicrodollars"].as_i64().unwrap_or(0) as f64 / 1e6;
            println!("granted ${usd:.6} to {owner}; balance is now ${balance:.6}");
        }
        CreditsCommand::Balance { common } => {
            let res = client(&common)?
                .call(Method::GET, "/api/profile/balance", None)
                .await?;
            if common.json {
                return print_json(&res);
            }
            let depleted = if res["isDepleted"] == true {
                " (depleted: paid models answer 402)"
            } else {
                ""
            };
            println!("${:.6}{depleted}", res["balance"].as_f64().unwrap_or(0.0));
        }
    }
    Ok(())
}

/// A time for `--since`/`--until`: RFC 3339, or a date (midnight UTC); ms since epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .ok_or_else(|| format!("`{text}` is neither a date (2026-11-28) nor an RFC 3339 time"))
}

/// `/api/usage` with the filters of `args`, URL-encoded.
fn usage_path(args: &UsageArgs) -> String {
    let mut url = reqwest::Url::parse("http://localhost/api/usage").expect("a valid URL");
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("limit", &args.limit.to_string());
        let filters = [
            ("model", args.model.clone()),
            ("provider", args.provider.clone()),
            ("status", args.status.map(|s| s.to_string())),
            ("feature", args.feature.clone()),
            ("projectId", args.project.clone()),
            ("taskId", args.task.clone()),
            ("user", args.user.clone()),
            ("since", args.since.map(|t| t.to_string())),
            ("until", args.until.map(|t| t.to_string())),
        ];
        for (name, value) in filters {
            if let Some(value) = value {
                q.append_pair(name, &value);
            }
        }
    }
    format!("{}?{}", url.path(), url.query().unwrap_or_default())
}

/// `kilocloud usage`.
pub async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let page = client(&args.common)?
        .call(Method::GET, &usage_path(&args), None)
        .await?;
    if args.common.json {
        return print_json(&page);
    }
    let rows = page["usage"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|u| {
            vec![
                time(&u["atMs"]),
                s(&u["model"]),
                s(&u["provider"]),
                s(&u["status"]),
                format!("{}/{}", s(&u["inputTokens"]), s(&u["outputTokens"])),
                format!(
                    "{:.6}",
                    u["costMicrodollars"].as_i64().unwrap_or(0) as f64 / 1e6
                ),
            ]
        })
        .collect();
    table(
        &[
            "TIME (UTC)",
            "MODEL",
            "PROVIDER",
            "STATUS",
            "TOKENS IN/OUT",
            "COST USD",
        ],
        rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_times_parse_as_dates_or_rfc3339() {
        assert_eq!(super::parse_time("2000-02-29"), Ok(951_782_400_000));
        assert_eq!(
            super::parse_time("2000-02-29T00:00:01Z"),
            Ok(951_782_401_000)
        );
        assert_eq!(
            super::parse_time("2000-02-29T01:00:00+01:00"),
            Ok(951_782_400_000)
        );
        assert!(
            super::parse_time("yesterday")
                .unwrap_err()
                .contains("yesterday")
        );
    }

    #[test]
    fn times_render_in_utc() {
        assert_eq!(super::chrono_like(0).unwrap(), "1970-01-01 00:00:00");
        assert_eq!(
            super::chrono_like(951_782_400_000).unwrap(),
            "2000-02-29 00:00:00"
        );
    }
}
