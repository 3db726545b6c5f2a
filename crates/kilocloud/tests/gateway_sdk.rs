//! Compatibility: the official `openai` Python SDK (from PyPI, installed by `scripts/test` into a
//! venv named by `KILOCLOUD_TEST_PYTHON`) talks to a real `kilocloud serve` whose gateway points
//! at the fake upstream: chat, streaming, tools (streamed and not), the model list, and a 402
//! surfacing as the SDK's error. The gateway charges what the SDK's requests cost.

mod common;

use common::{Node, Store};
use kilocloud_test_support::fake_openai::{FakeOpenAi, Reply};
use serde_json::{Value, json};

const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, key, broke_key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key=key, max_retries=0)
ask = [{"role": "user", "content": "hello"}]
tools = [{"type": "function", "function": {"name": "read_file", "description": "read a file",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]
out = {}
r = client.chat.completions.create(model="vendor/paid", messages=ask)
out["text"] = r.choices[0].message.content
out["prompt_tokens"] = r.usage.prompt_tokens
parts = []
for chunk in client.chat.completions.create(model="vendor/paid", messages=ask, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
out["streamed"] = "".join(parts)
t = client.chat.completions.create(model="vendor/paid", messages=ask, tools=tools)
call = t.choices[0].message.tool_calls[0]
out["tool"] = [call.function.name, json.loads(call.function.arguments)]
args, name = "", None
for chunk in client.chat.completions.create(model="vendor/paid", messages=ask, tools=tools, stream=True):
    if chunk.choices and chunk.choices[0].delta.tool_calls:
        d = chunk.choices[0].delta.tool_calls[0]
        name = name or d.function.name
        args += d.function.arguments or ""
out["streamed_tool"] = [name, json.loads(args)]
out["models"] = [m.id for m in client.models.list().data]
try:
    OpenAI(base_url=base, api_key=broke_key, max_retries=0).chat.completions.create(model="vendor/paid", messages=ask)
    out["broke"] = "served"
except openai.APIStatusError as e:
    out["broke"] = e.status_code
print(json.dumps(out))
"#;

async fn sdk_round_trip(store: Store) {
    let python = std::env::var("KILOCLOUD_TEST_PYTHON").expect(
        "KILOCLOUD_TEST_PYTHON is not set: run the tests with scripts/test, which installs the \
         openai SDK into a venv",
    );
    let upstream = FakeOpenAi::start().await;
    let config = store.dir().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[gateway]
[[gateway.providers]]
id = "fake"
kind = "openai-compatible"
base_url = "{}"
api_key = "upstream-key"
[[gateway.providers.models]]
id = "vendor/paid"
context_length = 100000
input_price = 3.0
output_price = 15.0
"#,
            upstream.base_url
        ),
    )
    .unwrap();
    let node = Node::start_with(&store, "node.log", &["--config", config.to_str().unwrap()]);
    let log = std::fs::read_to_string(store.dir().join("node.log")).unwrap();
    let admin_key = log
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("kc_"))
        .expect("bootstrap key")
        .to_owned();
    let http = reqwest::Client::new();
    let me: Value = http
        .get(node.url("/api/users/me"))
        .bearer_auth(&admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin = format!("user:{}", me["user"]["id"].as_str().unwrap());
    let granted = http
        .post(node.url("/api/admin/credits"))
        .bearer_auth(&admin_key)
        .json(&json!({"owner": admin, "amountMicrodollars": 1_000_000, "note": "sdk test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 200);
    let broke: Value = http
        .post(node.url("/api/users"))
        .bearer_auth(&admin_key)
        .json(&json!({"email": "broke@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let broke_key = broke["apiKey"].as_str().unwrap().to_owned();

    upstream.push(Reply::text("hello from the fake", 10, 5));
    upstream.push(Reply::text("a streamed answer", 20, 3));
    let read = || Reply::ToolCall {
        name: "read_file".into(),
        arguments: r#"{"path": "src/main.rs"}"#.into(),
    };
    upstream.push(read());
    upstream.push(read());

    let out = tokio::process::Command::new(&python)
        .args([
            "-c",
            SCRIPT,
            &node.url("/api/gateway/v1"),
            &admin_key,
            &broke_key,
        ])
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "SDK script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["text"], "hello from the fake");
    assert_eq!(got["prompt_tokens"], 10);
    assert_eq!(got["streamed"], "a streamed answer");
    assert_eq!(got["tool"], json!(["read_file", {"path": "src/main.rs"}]));
    assert_eq!(
        got["streamed_tool"],
        json!(["read_file", {"path": "src/main.rs"}])
    );
    assert_eq!(got["models"], json!(["vendor/paid"]));
    assert_eq!(got["broke"], 402);

    // 10×3+5×15 = 105; 20×3+3×15 = 105; two tool calls of 20×3+8×15 = 180 each.
    let balance: Value = http
        .get(node.url("/api/profile/balance"))
        .bearer_auth(&admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        balance["balanceMicrodollars"],
        1_000_000 - 105 - 105 - 180 - 180
    );
    assert_eq!(
        upstream.requests().len(),
        4,
        "the refused request never reached the provider"
    );
}

#[tokio::test]
async fn openai_sdk_sqlite() {
    sdk_round_trip(Store::sqlite().await).await;
}

#[tokio::test]
async fn openai_sdk_postgres() {
    sdk_round_trip(Store::postgres().await).await;
}
