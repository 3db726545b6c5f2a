//! Gateway overhead: one fast local upstream (the fake OpenAI provider, answering at once),
//! called three ways in the same run: directly; through `kilocloud serve` (the release binary
//! beside this one, SQLite, a paid catalog model, so every request is authenticated, balance
//! checked, metered and charged); and through the LiteLLM proxy when `--litellm` names its
//! executable (two workers, one per core). Streaming time to first byte at 100 req/s, then
//! paced (open-loop) load at 100, 1,000 and 5,000 req/s, non-streaming; the peak RSS of each
//! proxy (its processes together). A request that takes over 30 s counts as an error.
//!
//! Translation overhead, in the same run: the gateway's passthrough (a Chat client on an
//! OpenAI-compatible model; a Messages client on an Anthropic model) beside the translated
//! paths (a Messages client on the OpenAI-compatible model; a Chat client on the Anthropic
//! model), same upstreams, streamed (the whole stream) and not, at 100 and 1,000 req/s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kilocloud_test_support::fake_anthropic::FakeAnthropic;
use kilocloud_test_support::fake_openai::FakeOpenAi;
use serde_json::{Value, json};

use crate::Args;
use crate::report::{histogram, p50_p99};

/// One way to reach the upstream.
#[derive(Clone)]
struct Target {
    name: &'static str,
    url: String,
    key: String,
    model: &'static str,
    pid: Option<u32>,
    /// The client speaks Anthropic Messages (else OpenAI Chat Completions).
    messages: bool,
}

/// How much of a response a request waits for.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    /// The whole (non-streaming) body.
    Body,
    /// A stream's first chunk.
    FirstChunk,
    /// A whole stream.
    Stream,
}

struct Outcome {
    p50: f64,
    p99: f64,
    errors: u64,
    achieved: f64,
    rss_mb: Option<f64>,
}

/// Peak resident memory of `pid` and its descendants (LiteLLM's workers are child
/// processes), MB: the sum of each process's `VmHWM`.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let children: f64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter_map(peak_rss_mb)
        .sum();
    Some(kb / 1024.0 + children)
}

/// `rate` requests per second for `secs`, each started on its tick whatever the others do.
async fn paced(http: &reqwest::Client, t: &Target, rate: u32, secs: u64, wait: Wait) -> Outcome {
    let stream = wait != Wait::Body;
    let hist = Arc::new(std::sync::Mutex::new(histogram()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = rate as u64 * secs;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut body = json!({"model": t.model, "stream": stream,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}]});
    if t.messages {
        body["max_tokens"] = 256.into();
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let req = http.post(&t.url).bearer_auth(&t.key).json(&body);
        let (hist, errors) = (hist.clone(), errors.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            let ok = match req.send().await {
                Ok(res) if res.status().is_success() => {
                    let mut res = res;
                    match wait {
                        Wait::FirstChunk => matches!(res.chunk().await, Ok(Some(_))),
                        Wait::Body | Wait::Stream => res.bytes().await.is_ok(),
                    }
                }
                _ => false,
            };
            if ok {
                let _ = hist
                    .lock()
                    .unwrap()
                    .record(t0.elapsed().as_micros().max(1) as u64);
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let (p50, p99) = p50_p99(&hist.lock().unwrap());
    Outcome {
        p50,
        p99,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        achieved,
        rss_mb: t.pid.and_then(peak_rss_mb),
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `kilocloud serve` with a gateway pointing at `upstream`; returns it with an API key
/// holding $1,000.
async fn start_gateway(
    dir: &Path,
    upstream: &str,
    anthropic: &str,
) -> anyhow::Result<(Proc, Target)> {
    let bin = std::env::current_exe()?
        .parent()
        .context("no directory")?
        .join("kilocloud");
    anyhow::ensure!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release -p kilocloud`",
        bin.display()
    );
    let config = dir.join("kilocloud.toml");
    std::fs::write(
        &config,
        format!(
            "log_level = \"warn\"\n[gateway]\n[[gateway.providers]]\nid = \"fake\"\nkind = \"openai-compatible\"\n\
             base_url = \"{upstream}\"\napi_key = \"upstream-key\"\n[[gateway.providers.models]]\n\
             id = \"bench/model\"\nupstream_id = \"bench-model\"\ninput_price = 3.0\noutput_price = 15.0\n\
             [[gateway.providers]]\nid = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{anthropic}\"\n\
             api_key = \"upstream-key\"\n[[gateway.providers.models]]\nid = \"bench/claude\"\n\
             input_price = 3.0\noutput_price = 15.0\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("kilocloud.log"))?;
    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )?;
    let base = line
        .trim()
        .strip_prefix("kilocloud listening on ")
        .context("kilocloud did not start; see kilocloud.log")?
        .to_owned();
    let log = std::fs::read_to_string(dir.join("kilocloud.log"))?;
    let admin = log
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("kc_"))
        .context("no bootstrap key")?
        .to_owned();
    let http = reqwest::Client::new();
    let me: Value = http
        .get(format!("{base}/api/users/me"))
        .bearer_auth(&admin)
        .send()
        .await?
        .json()
        .await?;
    let owner = format!("user:{}", me["user"]["id"].as_str().unwrap_or_default());
    let granted = http
        .post(format!("{base}/api/admin/credits"))
        .bearer_auth(&admin)
        .json(&json!({"owner": owner, "amountMicrodollars": 1_000_000_000i64, "note": "bench"}))
        .send()
        .await?;
    anyhow::ensure!(
        granted.status().is_success(),
        "grant failed: {}",
        granted.status()
    );
    let pid = child.id();
    Ok((
        Proc(child),
        Target {
            name: "kilocloud gateway",
            url: format!("{base}/api/gateway/v1/chat/completions"),
            key: admin,
            model: "bench/model",
            pid: Some(pid),
            messages: false,
        },
    ))
}

/// Starts the LiteLLM proxy (`litellm` executable) routing `bench/model` to `upstream`.
async fn start_litellm(
    dir: &Path,
    litellm: &Path,
    upstream: &str,
) -> anyhow::Result<(Proc, Target)> {
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench/model\n    litellm_params:\n      model: openai/bench-model\n      \
             api_base: {upstream}\n      api_key: upstream-key\ngeneral_settings:\n  master_key: sk-bench\n"
        ),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::fs::File::create(dir.join("litellm.log"))?;
    let child = Command::new(litellm)
        .arg("--config")
        .arg(&config)
        // One worker per core, as our server uses both.
        .args(["--port", &port.to_string(), "--num_workers", "2"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot run {}", litellm.display()))?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(r) = http.get(format!("{base}/health/liveliness")).send().await
            && r.status().is_success()
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "LiteLLM did not start; see litellm.log"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pid = child.id();
    Ok((
        Proc(child),
        Target {
            name: "LiteLLM proxy",
            url: format!("{base}/v1/chat/completions"),
            key: "sk-bench".into(),
            model: "bench/model",
            pid: Some(pid),
            messages: false,
        },
    ))
}

/// Runs the group and returns its Markdown section.
pub async fn run(args: &Args) -> anyhow::Result<String> {
    let secs = if args.quick { 2 } else { 10 };
    let dir = kilocloud_test_support::temp_dir();
    let upstream = FakeOpenAi::start_quiet().await;
    let direct = Target {
        name: "direct",
        url: format!("{}/chat/completions", upstream.base_url),
        key: "upstream-key".into(),
        model: "bench-model",
        pid: None,
        messages: false,
    };
    let claude = FakeAnthropic::start().await;
    let (_gw, gateway) = start_gateway(dir.path(), &upstream.base_url, &claude.base_url).await?;
    let mut litellm = None;
    if let Some(path) = &args.litellm {
        litellm = Some(start_litellm(dir.path(), &PathBuf::from(path), &upstream.base_url).await?);
    }
    let mut targets = vec![&direct, &gateway];
    if let Some((_, t)) = &litellm {
        targets.push(t);
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    // Streaming first: a proxy that falls behind at the higher rates below would otherwise
    // carry its backlog into this table.
    let mut out = String::from(
        "### Streaming time to first byte (100 req/s)\n\n| path | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let mut base: Option<(f64, f64)> = None;
    for t in &targets {
        paced(&http, t, 100, 1, Wait::FirstChunk).await; // warm-up
        let o = paced(&http, t, 100, secs, Wait::FirstChunk).await;
        let (b50, b99) = *base.get_or_insert((o.p50, o.p99));
        out += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
            t.name,
            o.p50,
            o.p99,
            o.p50 - b50,
            o.p99 - b99,
            o.errors
        );
    }
    out += &format!(
        "\n### Gateway overhead (non-streaming, paced for {secs} s per cell; a fast local upstream)\n\n\
         | rate req/s | path | achieved req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors | peak RSS MB |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for rate in [100u32, 1_000, 5_000] {
        let mut base: Option<(f64, f64)> = None;
        for t in &targets {
            paced(&http, t, rate.min(200), 1, Wait::Body).await; // warm-up
            let o = paced(&http, t, rate, secs, Wait::Body).await;
            let (b50, b99) = *base.get_or_insert((o.p50, o.p99));
            out += &format!(
                "| {rate} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |\n",
                t.name,
                o.achieved,
                o.p50,
                o.p99,
                o.p50 - b50,
                o.p99 - b99,
                o.errors,
                o.rss_mb.map_or("-".into(), |m| format!("{m:.0}"))
            );
        }
    }
    out += &translation(&http, &gateway, secs).await;
    Ok(out)
}

/// The translation table: each translated path beside the passthrough to the same upstream.
async fn translation(http: &reqwest::Client, gateway: &Target, secs: u64) -> String {
    let base = gateway.url.trim_end_matches("/chat/completions");
    let path = |name, model, messages| Target {
        name,
        url: if messages {
            format!("{base}/messages")
        } else {
            gateway.url.clone()
        },
        model,
        messages,
        ..gateway.clone()
    };
    let pairs = [
        (
            path(
                "Chat → OpenAI-compatible (passthrough)",
                "bench/model",
                false,
            ),
            path(
                "Messages → OpenAI-compatible (translated)",
                "bench/model",
                true,
            ),
        ),
        (
            path("Messages → Anthropic (passthrough)", "bench/claude", true),
            path("Chat → Anthropic (translated)", "bench/claude", false),
        ),
    ];
    let mut out = format!(
        "\n### Translation overhead (paced for {secs} s per cell; a streamed request waits for its whole stream)\n\n\
         | rate req/s | mode | path | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |\n\
         |---:|---|---|---:|---:|---:|---:|---:|\n"
    );
    for rate in [100u32, 1_000] {
        for wait in [Wait::Body, Wait::Stream] {
            let mode = if wait == Wait::Body {
                "whole body"
            } else {
                "stream"
            };
            for (plain, translated) in &pairs {
                paced(http, plain, rate.min(200), 1, wait).await; // warm-up
                paced(http, translated, rate.min(200), 1, wait).await;
                let p = paced(http, plain, rate, secs, wait).await;
                let t = paced(http, translated, rate, secs, wait).await;
                for (target, o) in [(plain, &p), (translated, &t)] {
                    out += &format!(
                        "| {rate} | {mode} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
                        target.name,
                        o.p50,
                        o.p99,
                        o.p50 - p.p50,
                        o.p99 - p.p99,
                        o.errors
                    );
                }
            }
        }
    }
    out.push('\n');
    out
}
