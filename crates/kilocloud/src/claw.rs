//! `kilocloud claw …`: KiloClaw assistant runtimes of the owner acted for (`--org` for an
//! organization): create, list, status, start, stop, destroy, and `open`, which prints the
//! browser URL and a 10-minute access code.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::account::{Common, client, print_json, s, table, time};

/// `kilocloud claw`.
#[derive(Subcommand)]
pub enum ClawCommand {
    /// Create an instance and start its runtime.
    Create(CreateArgs),
    /// The owner's instances.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One instance, with a live check of its machine.
    Status(IdArgs),
    /// Start an instance's runtime.
    Start(IdArgs),
    /// Stop an instance's runtime (its volume is kept).
    Stop(IdArgs),
    /// Destroy an instance: its machine and volume are deleted.
    Destroy(IdArgs),
    /// Print the URL to open the instance in a browser, with a one-time access code.
    Open(IdArgs),
}

/// `kilocloud claw create`.
#[derive(Args)]
pub struct CreateArgs {
    /// Display name.
    #[arg(long, default_value = "claw")]
    name: String,
    /// An env variable for the runtime, `NAME=value` (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// A secret env variable, `NAME=value` (repeatable; stored encrypted, never shown).
    #[arg(long = "secret", value_name = "NAME=VALUE")]
    secrets: Vec<String>,
    /// Default model, `kilocode/<provider>/<model>`.
    #[arg(long)]
    model: Option<String>,
    /// Preferred region.
    #[arg(long)]
    region: Option<String>,
    /// Provision only (app and volume); start later with `claw start`.
    #[arg(long)]
    no_start: bool,
    #[command(flatten)]
    common: Common,
}

/// An instance id and the common flags.
#[derive(Args)]
pub struct IdArgs {
    /// Instance id.
    id: String,
    #[command(flatten)]
    common: Common,
}

fn pairs(items: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--{what} takes NAME=VALUE, got `{i}`"))
        })
        .collect()
}

fn show(v: &Value, common: &Common) -> anyhow::Result<()> {
    if common.json {
        return print_json(v);
    }
    table(
        &["INSTANCE", "NAME", "STATUS", "MACHINE", "REGION", "CREATED"],
        vec![row(v)],
    );
    Ok(())
}

fn row(v: &Value) -> Vec<String> {
    let status = match v["machineState"].as_str() {
        Some(m) => format!("{} ({m})", s(&v["status"])),
        None => s(&v["status"]),
    };
    vec![
        s(&v["id"]),
        s(&v["name"]),
        status,
        s(&v["machineId"]),
        s(&v["region"]),
        time(&v["createdAt"]),
    ]
}

/// `POST /api/claw/instances/<id>/<action>`, then the instance.
async fn action(a: &IdArgs, action: &str) -> anyhow::Result<()> {
    let path = format!("/api/claw/instances/{}/{action}", a.id);
    let v = client(&a.common)?.call(Method::POST, &path, None).await?;
    show(&v, &a.common)
}

/// Runs a `kilocloud claw` command.
pub async fn claw(command: ClawCommand) -> anyhow::Result<()> {
    let base = "/api/claw/instances";
    match command {
        ClawCommand::Create(a) => {
            let body = json!({
                "name": a.name,
                "envVars": pairs(&a.env, "env")?,
                "secrets": pairs(&a.secrets, "secret")?,
                "defaultModel": a.model,
                "region": a.region,
                "start": !a.no_start,
            });
            let created = client(&a.common)?
                .call(Method::POST, base, Some(body))
                .await?;
            show(&created, &a.common)?;
            if !a.common.json {
                eprintln!(
                    "\nOpen it in a browser with `kilocloud claw open {}`.",
                    s(&created["id"])
                );
            }
            Ok(())
        }
        ClawCommand::List { common } => {
            let list = client(&common)?.call(Method::GET, base, None).await?;
            if common.json {
                return print_json(&list);
            }
            let rows = list.as_array().into_iter().flatten().map(row).collect();
            table(
                &["INSTANCE", "NAME", "STATUS", "MACHINE", "REGION", "CREATED"],
                rows,
            );
            Ok(())
        }
        ClawCommand::Status(a) => {
            let path = format!("{base}/{}/status", a.id);
            let v = client(&a.common)?.call(Method::GET, &path, None).await?;
            show(&v, &a.common)
        }
        ClawCommand::Start(a) => action(&a, "start").await,
        ClawCommand::Stop(a) => action(&a, "stop").await,
        ClawCommand::Destroy(a) => {
            let path = format!("{base}/{}", a.id);
            let v = client(&a.common)?.call(Method::DELETE, &path, None).await?;
            if a.common.json {
                return print_json(&v);
            }
            if v["complete"].as_bool() == Some(true) {
                println!("destroyed {}: machine and volume deleted", a.id);
            } else {
                println!(
                    "destroying {}: the provider has not confirmed every delete yet; it is \
                     retried every minute",
                    a.id
                );
            }
            Ok(())
        }
        ClawCommand::Open(a) => {
            let client = client(&a.common)?;
            let path = format!("{base}/{}/access-code", a.id);
            let v = client.call(Method::POST, &path, None).await?;
            if a.common.json {
                return print_json(&v);
            }
            let url = client.url(&s(&v["path"]))?;
            println!("{url}");
            println!(
                "access code: {} (valid until {} UTC, once)",
                s(&v["code"]),
                time(&v["expiresAt"])
            );
            Ok(())
        }
    }
}
